"""Markdown tables, the RESULTS.md section and the accuracy-vs-sparsity curve from ``results.json``."""

from __future__ import annotations

import os
from pathlib import Path

BEGIN = "<!-- BEGIN benchmarks/run.py (generated: rerun the command instead of editing) -->"
END = "<!-- END benchmarks/run.py -->"
HEADING = "## Methods side by side: top-1 vs sparsity (`benchmarks/run.py`)"
METHOD_ORDER = ("magnitude", "global-magnitude", "reconstruct", "unipts")
LABELS = {
    "magnitude": "magnitude (uniform)",
    "global-magnitude": "global-magnitude",
    "reconstruct": "reconstruct (SparseGPT-style)",
    "unipts": "unipts",
}
FASHION = ("fashion", "fashion-bn")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _secs(v: float | None) -> str:
    if v is None:
        return "?"
    return f"{v:.0f} s" if v < 600 else f"{v / 60:.1f} min"


def _methods(runs: dict) -> list[str]:
    seen = {r["method"] for r in runs.values()}
    return [m for m in METHOD_ORDER if m in seen] + sorted(seen - set(METHOD_ORDER))


def _sparsities(runs: dict) -> list[float]:
    return sorted({r["sparsity"] for r in runs.values()})


def _targets(name: str, case: dict) -> list[str]:
    runs = case["runs"]
    lines = []
    at = {r["method"]: r for r in runs.values() if r["sparsity"] == 0.9 and r.get("top1") is not None}
    if "unipts" not in at:
        return ["- targets at 0.9: no unipts result at 0.9 in this table"]
    u = at["unipts"]["top1"]
    others = {m: r["top1"] for m, r in at.items() if m != "unipts"}
    if others:
        best = max(others, key=others.get)
        gap = 100 * (u - others[best])
        verdict = "met" if gap > 0 else f"missed by {-gap:.2f} points"
        lines.append(f"- unipts beats every other method at 0.9: {_pct(u)} vs best other {best} "
                     f"{_pct(others[best])} ({gap:+.2f} points): **{verdict}**")
    if name in FASHION:
        drop = 100 * (case["dense"]["top1"] - u)
        verdict = "met" if drop <= 2 else f"missed by {drop - 2:.2f} points"
        lines.append(f"- unipts within 2 points of dense at 0.9: {_pct(u)} vs dense {_pct(case['dense']['top1'])} "
                     f"({-drop:+.2f} points): **{verdict}**")
    return lines


def case_table(name: str, case: dict) -> list[str]:
    runs = case["runs"]
    sparsities = _sparsities(runs)
    out = [f"### {case['title']}", "", f"{case['source']}. Dense top-1 **{_pct(case['dense']['top1'])}%** on "
           f"{case['test_images']:,} test images ({case['classes']} classes)."]
    if case.get("preprocess"):
        out.append("Preprocessing: " + " → ".join(case["preprocess"]) + ".")
    for note in case.get("notes", []):
        out.append(f"Note: {note}.")
    out += ["", "Top-1 (%) of the pruned model, and the wall time of its `prune` run (import, calibration "
            "decoding, method, write-back, verification):", ""]
    out.append("| method | " + " | ".join(f"{s:g}" for s in sparsities) + " |")
    out.append("|---|" + "---:|" * len(sparsities))
    out.append("| dense | " + " | ".join(_pct(case["dense"]["top1"]) for _ in sparsities) + " |")
    for method in _methods(runs):
        cells = []
        for s in sparsities:
            r = runs.get(f"{method}@{s:g}")
            if r is None:
                cells.append("not run")
            elif r.get("error"):
                cells.append(f"error ({_secs(r.get('wall_s'))})")
            else:
                cells.append(f"{_pct(r['top1'])} ({_secs(r['wall_s'])})")
        out.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    errors = [f"- {k}: {r['error']}" for k, r in runs.items() if r.get("error")]
    if errors:
        out += ["", "Errors:", *errors]
    out += ["", *_targets(name, case), ""]
    return out


def markdown(results: dict) -> str:
    m = results.get("machine", {})
    lines = [HEADING, "", BEGIN, ""]
    lines.append(
        f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('threads', '?')} torch/onnxruntime "
        f"thread(s); {m.get('platform', '?')}; Python {m.get('python', '?')}, torch {m.get('torch', '?')}, "
        f"onnxruntime {m.get('onnxruntime', '?')}; CUDA: {m.get('cuda') or 'none'}. Same calibration images, "
        "seed 0 and holdout split for every method of a case; default recipes (UniPTS: the quick recipe); "
        "`global-magnitude` and `magnitude` include the pipeline's statistics correction (BatchNorm "
        "re-estimation where the graph kept BatchNorm, per-channel correction elsewhere); `reconstruct` is "
        "`onnxsparse/methods/reconstruct.py`."
    )
    lines += ["", "Runs that produced these numbers (results accumulate in `benchmarks/results.json`):", ""]
    for inv in results.get("invocations", []):
        if "wall_s" not in inv:
            continue
        load = inv.get("load_before", [None])[0]
        budget = inv.get("unipts_budget_s")
        lines.append(f"- `{' '.join(inv['argv'])}`: {_secs(inv['wall_s'])} wall, started {inv['started']}"
                     + (f", load average {load:.1f} at start" if load is not None else "")
                     + (f"; UniPTS time budget {budget:g} s per run" if budget else ""))
    lines.append("")
    for name, case in results.get("cases", {}).items():
        if case.get("runs"):
            lines += case_table(name, case)
    lines += ["![top-1 vs sparsity](curve.png)", "", END]
    return "\n".join(lines)


def update_results_md(path: Path, section: str) -> None:
    """Replace this command's section of ``path`` (between the markers), or append it; other sections stay."""
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmark results\n"
    body = section[section.index(BEGIN):]
    if BEGIN in text and END in text:
        start = text.index(BEGIN)
        end = text.index(END) + len(END)
        new = text[:start] + body + text[end:]
        if HEADING not in new:
            new = new.replace(body, HEADING + "\n\n" + body)
    else:
        new = text.rstrip("\n") + "\n\n" + section + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, path)


def curve(results: dict, path: Path) -> Path | None:
    """Top-1 vs sparsity, one panel per case, one line per method, dense dashed. None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    cases = [(n, c) for n, c in results.get("cases", {}).items() if c.get("runs")]
    if not cases:
        return None
    cols = 2 if len(cases) > 1 else 1
    rows = (len(cases) + cols - 1) // cols
    fig = Figure(figsize=(6.0 * cols, 4.0 * rows), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colors = {m: f"C{i}" for i, m in enumerate(METHOD_ORDER)}
    for ax, (name, case) in zip(axes, cases):
        runs = case["runs"]
        for method in _methods(runs):
            pts = sorted((r["sparsity"], 100 * r["top1"]) for r in runs.values()
                         if r["method"] == method and r.get("top1") is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colors.get(method),
                        label=LABELS.get(method, method), linewidth=2 if method == "unipts" else 1.3)
        ax.axhline(100 * case["dense"]["top1"], color="k", linestyle="--", linewidth=1, label="dense")
        ax.axhline(100 / max(case["classes"], 1), color="0.6", linestyle=":", linewidth=1, label="chance")
        ax.set_title(case["title"], fontsize=9)
        ax.set_xlabel("sparsity")
        ax.set_ylabel("top-1 (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    for ax in axes[len(cases):]:
        ax.set_visible(False)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path
