"""Markdown tables, the RESULTS.md section and the accuracy-vs-sparsity curve from ``results.json``."""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks.provenance import row_label

BEGIN = "<!-- BEGIN benchmarks/run.py (generated: rerun the command instead of editing) -->"
END = "<!-- END benchmarks/run.py -->"
HEADING = "## Methods side by side: accuracy vs sparsity (`benchmarks/run.py`)"
METHOD_ORDER = ("magnitude", "global-magnitude", "reconstruct", "unipts", "onnxsim-magnitude", "onnxsim-wanda",
                "onnxsim-sparsegpt")
LABELS = {
    "magnitude": "magnitude (uniform)",
    "global-magnitude": "global-magnitude",
    "reconstruct": "reconstruct (SparseGPT-style)",
    "unipts": "unipts",
    "onnxsim-magnitude": "onnxsim magnitude",
    "onnxsim-wanda": "onnxsim Wanda",
    "onnxsim-sparsegpt": "onnxsim SparseGPT",
}
PEER_PREFIX = "onnxsim-"
FASHION = ("fashion", "fashion-bn")
# Cases recorded without a "metric" entry are classifiers scored by top-1.
TOP1 = {"names": ["top1"], "titles": {"top1": "top-1"}, "percent": True, "against_dense": False}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _metric(case: dict) -> dict:
    return case.get("metric") or TOP1


def _value(v: float | None, metric: dict) -> str:
    if not metric["percent"]:
        return "-" if v is None else f"{v:.4f}"
    return _pct(v)


def _diff(d: float, metric: dict) -> str:
    return f"{100 * d:+.2f} points" if metric["percent"] else f"{d:+.4f}"


def _title(metric: dict, name: str) -> str:
    title = metric["titles"].get(name, name)
    title = title[:1].upper() + title[1:]
    return f"{title} (%)" if metric["percent"] else title


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
    metric = _metric(case)
    key = metric["names"][0]
    lines = []
    at = {r["method"]: r for r in runs.values() if r["sparsity"] == 0.9 and r.get(key) is not None}
    if "unipts" not in at:
        return ["- targets at 0.9: no unipts result at 0.9 in this table"]
    u = at["unipts"][key]
    others = {m: r[key] for m, r in at.items() if m != "unipts"}
    if others:
        best = max(others, key=others.get)
        gap = u - others[best]
        verdict = "met" if gap > 0 else "missed: level with it" if gap == 0 else \
            f"missed by {_diff(-gap, metric).lstrip('+')}"
        lines.append(f"- unipts beats every other method at 0.9: {_value(u, metric)} vs best other {best} "
                     f"{_value(others[best], metric)} ({_diff(gap, metric)}): **{verdict}**")
    if name in FASHION:
        drop = 100 * (case["dense"]["top1"] - u)
        verdict = "met" if drop <= 2 else f"missed by {drop - 2:.2f} points"
        lines.append(f"- unipts within 2 points of dense at 0.9: {_pct(u)} vs dense {_pct(case['dense']['top1'])} "
                     f"({-drop:+.2f} points): **{verdict}**")
    return lines


def _intro(case: dict, metric: dict) -> str:
    if "metric" not in case:
        return (f"{case['source']}. Dense top-1 **{_pct(case['dense']['top1'])}%** on {case['test_images']:,} test "
                f"images ({case['classes']} classes).")
    if metric["against_dense"]:
        return (f"{case['source']}. Scored against the dense model's own outputs on {case['test_images']:,} test "
                "images, so the dense row is 1 by definition.")
    unit = "%" if metric["percent"] else ""
    values = [f"{metric['titles'][k]} " + (f"**{_value(case['dense'][k], metric)}{unit}**" if i == 0 else
                                           f"{_value(case['dense'][k], metric)}{unit}")
              for i, k in enumerate(metric["names"])]
    return f"{case['source']}. Dense " + ", ".join(values) + f" on {case['test_images']:,} test images."


def _date(row: dict) -> str:
    return row.get("date") or row.get("finished") or ""


def newest_label(runs: dict) -> str | None:
    """The commit of a table's most recent row: cells from any other commit are marked with theirs."""
    if not runs:
        return None
    return row_label(max(runs.values(), key=_date))


def below_target(row: dict) -> bool:
    """A peer's output with fewer zeros over our prunable weights than the target."""
    peer = row.get("peer")
    return isinstance(peer, dict) and peer.get("reaches_target") is False


def _marks(row: dict, newest: str | None) -> str:
    marks = []
    label = row_label(row)
    if label != newest:
        marks.append(f"[{label}]")
    if below_target(row):
        marks.append(f"**below target: {row['peer']['achieved_sparsity']:.3f}**")
    return "".join(f" {m}" for m in marks)


def _cells(runs: dict, method: str, sparsities: list[float], key: str, metric: dict, timed: bool,
           newest: str | None = None) -> list[str]:
    cells = []
    for s in sparsities:
        r = runs.get(f"{method}@{s:g}")
        if r is None:
            cells.append("not run")
        elif r.get("error"):
            cells.append((f"error ({_secs(r.get('wall_s'))})" if timed else "error") + _marks(r, newest))
        elif timed:
            cells.append(f"{_value(r.get(key), metric)} ({_secs(r['wall_s'])})" + _marks(r, newest))
        else:
            cells.append(_value(r.get(key), metric) + _marks(r, newest))
    return cells


def _table(case: dict, key: str, metric: dict, sparsities: list[float], timed: bool) -> list[str]:
    runs = case["runs"]
    newest = newest_label(runs)
    out = ["| method | " + " | ".join(f"{s:g}" for s in sparsities) + " |", "|---|" + "---:|" * len(sparsities)]
    dense = 1.0 if metric["against_dense"] else case["dense"][key]
    out.append("| dense | " + " | ".join(_value(dense, metric) for _ in sparsities) + " |")
    for method in _methods(runs):
        cells = _cells(runs, method, sparsities, key, metric, timed, newest)
        out.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    return out


def commit_lines(runs: dict) -> list[str]:
    """Which code made a table: its newest commit, and the other commits its marked cells come from."""
    newest = newest_label(runs)
    if newest is None:
        return []
    dates: dict[str, list[str]] = {}
    for r in runs.values():
        dates.setdefault(row_label(r), []).append(_date(r)[:10])

    def when(label: str) -> str:
        days = sorted(d for d in dates[label] if d)
        return "" if not days else f" ({days[0]})" if days[0] == days[-1] else f" ({days[0]} to {days[-1]})"

    if newest == "unrecorded" and len(dates) == 1:
        return ["Code: not recorded (these rows were written before rows recorded their commit)."]
    lines = [f"Code: commit `{newest}`{when(newest)}"
             + (" for every cell." if len(dates) == 1 else "; a cell marked [other] comes from that other commit:")]
    for label in sorted(set(dates) - {newest}):
        what = ("rows written before rows recorded their commit" if label == "unrecorded"
                else f"commit `{label}`")
        lines.append(f"- [{label}]: {len(dates[label])} cell(s), {what}{when(label)}")
    if any(label.endswith("+dirty") for label in dates):
        lines.append("- +dirty: the working tree differed from that commit when the row ran.")
    return lines


def _peer_sparsity(runs: dict, sparsities: list[float]) -> list[str]:
    """The onnxsim peers' achieved sparsity over the prunable weights our importer counts."""
    peer_methods = [m for m in _methods(runs) if m.startswith(PEER_PREFIX)]
    if not peer_methods:
        return []
    counted = next((r["peer"] for r in runs.values() if isinstance(r.get("peer"), dict)), None)
    what = (f" ({counted['prunable_params']:,} weights in {counted['layers']} layers)" if counted else "")
    out = ["", f"Achieved sparsity of the onnxsim peers' outputs over the prunable weights onnxsparse counts{what}; "
           "**below target** marks a peer that zeroed fewer than the target fraction:", "",
           "| peer | " + " | ".join(f"{s:g}" for s in sparsities) + " |", "|---|" + "---:|" * len(sparsities)]
    for method in peer_methods:
        cells = []
        for s in sparsities:
            r = runs.get(f"{method}@{s:g}")
            if r is None:
                cells.append("not run")
            elif not isinstance(r.get("peer"), dict):
                cells.append("error")
            else:
                cells.append(f"{r['peer']['achieved_sparsity']:.4f}" + (" **below target**" if below_target(r) else ""))
        out.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    return out


def case_table(name: str, case: dict) -> list[str]:
    runs = case["runs"]
    metric = _metric(case)
    main, *others = metric["names"]
    sparsities = _sparsities(runs)
    out = [f"### {case['title']}", "", _intro(case, metric)]
    if metric.get("description"):
        out.append(f"Metric: {metric['description']}.")
    if case.get("preprocess"):
        out.append("Preprocessing: " + " → ".join(case["preprocess"]) + ".")
    for note in case.get("notes", []):
        out.append(f"Note: {note}.")
    out += ["", f"{_title(metric, main)} of the pruned model, and the wall time of its `prune` run (import, "
            "calibration decoding, method, write-back, verification; for an onnxsim peer: its pruning call, the "
            "save and the onnxruntime check, the calibration images decoded once per case beforehand):", ""]
    out += _table(case, main, metric, sparsities, timed=True)
    for key in others:
        out += ["", f"{_title(metric, key)} of the pruned model:", ""]
        out += _table(case, key, metric, sparsities, timed=False)
    out += _peer_sparsity(runs, sparsities)
    code = commit_lines(runs)
    if code:
        out += ["", *code]
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
        "seed 0 and train/selection/verification split for every method of a case; default recipes (UniPTS: the quick recipe); "
        "`global-magnitude` and `magnitude` include the pipeline's statistics correction (BatchNorm "
        "re-estimation where the graph kept BatchNorm, per-channel correction elsewhere); `reconstruct` is "
        "`onnxsparse/methods/reconstruct.py`; the onnxsim rows are onnxsim's own `apply_magnitude_pruning`, "
        "`apply_wanda_pruning` and `apply_sparsegpt_pruning` at their defaults (`benchmarks/peers.py`), given the "
        "training split of the same calibration images. Each table names the commit its cells ran at."
    )
    lines += ["", "Runs that produced these numbers (results accumulate in `benchmarks/results.json`):", ""]
    for inv in results.get("invocations", []):
        load = inv.get("load_before", [None])[0]
        budget = inv.get("unipts_budget_s")
        wall = (f"{_secs(inv['wall_s'])} wall" if "wall_s" in inv
                else "stopped before its end (the rows it finished are kept)")
        lines.append(f"- `{' '.join(inv['argv'])}`: {wall}, started {inv['started']}"
                     + (f", load average {load:.1f} at start" if load is not None else "")
                     + (f"; UniPTS time budget {budget:g} s per run" if budget else ""))
    lines.append("")
    for name, case in results.get("cases", {}).items():
        if case.get("runs"):
            lines += case_table(name, case)
    lines += ["![accuracy vs sparsity](curve.png)", "", END]
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
    """Each case's main metric vs sparsity, one panel per case, one line per method, dense dashed (and chance
    for the classifiers). None without matplotlib."""
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
        metric = _metric(case)
        key = metric["names"][0]
        scale = 100 if metric["percent"] else 1
        for method in _methods(runs):
            pts = sorted((r["sparsity"], scale * r[key]) for r in runs.values()
                         if r["method"] == method and r.get(key) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colors.get(method),
                        label=LABELS.get(method, method), linewidth=2 if method == "unipts" else 1.3)
        dense = 1.0 if metric["against_dense"] else case["dense"][key]
        ax.axhline(scale * dense, color="k", linestyle="--", linewidth=1, label="dense")
        if case.get("classes"):
            ax.axhline(100 / max(case["classes"], 1), color="0.6", linestyle=":", linewidth=1, label="chance")
        ax.set_title(case["title"], fontsize=9)
        ax.set_xlabel("sparsity")
        ax.set_ylabel(_title(metric, key))
        ax.set_ylim(0, scale)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    for ax in axes[len(cases):]:
        ax.set_visible(False)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path
