"""A PNG next to the JSON report of ``prune --report``: per-layer sparsity allotted, and the training curve.

The training curve is whatever per-epoch record the method left in ``report["method_info"]``: the first list of
dicts found (depth first, lists under a key named ``curve`` preferred) whose rows carry an ``epoch``, ``step``
or ``iteration`` number and at least one other numeric column. A search history (rows keyed by ``generation``)
gets a panel of its own. matplotlib is optional (extra ``plot``); without it one log line says so and no PNG
is written.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

_X_KEYS = ("epoch", "step", "iteration")
_SKIP_Y = {"seconds", "step", "epoch", "iteration", "generation", "evaluated", "lr", "tau"}


def plot_path(report_path: str | os.PathLike) -> Path:
    """``report.json`` -> ``report.png`` (a report already named ``.png`` gets ``.plot.png``)."""
    p = Path(report_path)
    return p.with_name(p.name + ".plot.png") if p.suffix.lower() == ".png" else p.with_suffix(".png")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _tables(obj, path: str = "") -> Iterator[tuple[str, list[dict]]]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _tables(value, f"{path}.{key}" if path else str(key))
    elif isinstance(obj, list) and obj and all(isinstance(r, dict) for r in obj):
        yield path, obj
        for i, row in enumerate(obj):
            yield from _tables(row, f"{path}[{i}]")


def _numeric_columns(rows: list[dict], x_key: str) -> list[str]:
    keys: list[str] = []
    for row in rows:
        for k, v in row.items():
            if k != x_key and k not in _SKIP_Y and _number(v) and k not in keys:
                keys.append(k)
    return keys


def find_curve(method_info: dict | None, x_keys: tuple[str, ...] = _X_KEYS) -> tuple[str, str, list[dict]] | None:
    """(where, x key, rows) of the training curve in ``method_info``, or None."""
    if not isinstance(method_info, dict):
        return None
    found = []
    for where, rows in _tables(method_info):
        for x in x_keys:
            if all(_number(r.get(x)) for r in rows) and _numeric_columns(rows, x):
                found.append((0 if where.split(".")[-1] == "curve" else 1, where, x, rows))
                break
    if not found:
        return None
    _, where, x, rows = min(found, key=lambda f: f[0])
    return where, x, rows


def _layer_panel(ax, report: dict) -> None:
    rows = report.get("layers", [])
    names = [(r.get("node") or r.get("name") or "?")[-24:] for r in rows]
    target = [r.get("target_sparsity", 0.0) for r in rows]
    achieved = [r.get("achieved_sparsity", 0.0) for r in rows]
    xs = range(len(rows))
    ax.bar(xs, target, color="#4c72b0", label="allotted")
    ax.plot(xs, achieved, "k.", markersize=4, label="achieved")
    overall = report.get("target_sparsity")
    if _number(overall):
        ax.axhline(overall, color="#dd8452", linestyle="--", linewidth=1, label=f"target {overall:.0%}")
    ax.set_ylim(0, 1)
    ax.set_ylabel("sparsity")
    ax.set_title(f"per-layer sparsity allotted by {report.get('method', '?')} "
                 f"(achieved {report.get('achieved_sparsity', 0):.2%} of {report.get('prunable_params', 0):,})")
    if len(rows) <= 60:
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=90, fontsize=6)
    else:
        ax.set_xlabel("layer (graph order)")
    ax.legend(loc="lower right", fontsize=7)


def _series(xs: list, rows: list[dict], column: str) -> tuple[list, list]:
    """(x, y) of the rows where ``column`` holds a number."""
    pts = [(x, r[column]) for x, r in zip(xs, rows) if _number(r.get(column))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _curve_panel(ax, where: str, x_key: str, rows: list[dict], title: str) -> None:
    xs = [r[x_key] for r in rows]
    cols = _numeric_columns(rows, x_key)
    left = [c for c in cols if "loss" in c or "kl" in c or c in ("best", "mean", "best_so_far")] or cols[:1]
    right = [c for c in cols if c not in left]
    for c in left:
        ax.plot(*_series(xs, rows, c), marker="o", markersize=3, label=c)
    ax.set_xlabel(x_key)
    ax.set_ylabel(", ".join(left)[:40])
    ax.set_title(f"{title} ({where})", fontsize=9)
    handles, labels = ax.get_legend_handles_labels()
    if right:
        ax2 = ax.twinx()
        for i, c in enumerate(right[:4]):
            ax2.plot(*_series(xs, rows, c), linestyle="--", color=f"C{i + len(left)}", label=c)
        ax2.set_ylabel(", ".join(right[:4])[:40])
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=7, loc="best")


def write_report_plot(report: dict, path: str | os.PathLike) -> Path | None:
    """Write the PNG for ``report`` to ``path``; returns the path, or None when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'onnxsparse[plot]'): no plot written for the report")
        return None
    info = report.get("method_info")
    curves = [(found, title) for found, title in ((find_curve(info), "training curve"),
                                                 (find_curve(info, ("generation",)), "allocation search"))
              if found is not None]
    panels = 1 + len(curves)
    fig = Figure(figsize=(max(8.0, min(20.0, 0.18 * len(report.get("layers", [])) + 4)), 3.6 * panels), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(panels, 1, squeeze=False)[:, 0]
    _layer_panel(axes[0], report)
    for ax, (found, title) in zip(axes[1:], curves):
        _curve_panel(ax, *found, title=title)
    fig.tight_layout()
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, out)
    logger.info("wrote %s", out)
    return out
