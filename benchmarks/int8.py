#!/usr/bin/env python3
"""Dense fp32, sparse fp32, dense int8 (onnxruntime ``quantize_static`` alone: the peer) and sparse int8
(``prune --quantize int8``): accuracy, file size and onnxruntime CPU latency side by side.

    python benchmarks/int8.py samples/fashion_mnist/model.onnx --calib samples/fashion_mnist/calib \\
        --data samples/fashion_mnist/test --sparsity 0.7 --method magnitude

Latency: batch 1 and 32, 1 and 2 intra-op threads, median of repeated runs after warm-up, the fastest of
``--passes`` interleaved passes over the four models (:func:`onnxsparse.quantize.latency.latency_table`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import onnx

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.speed import machine  # noqa: E402
from onnxsparse.config import PruneConfig  # noqa: E402
from onnxsparse.data import load_calibration  # noqa: E402
from onnxsparse.data.preprocess_resolution import SIDECAR_NAME  # noqa: E402
from onnxsparse.exporter.save import files_size, model_files, zip_size  # noqa: E402
from onnxsparse.pipeline import QUANTIZE_SAMPLES, prune  # noqa: E402
from onnxsparse.quantize import Calibration, latency_table, peer_int8  # noqa: E402


def build(model: Path, calib: str, sparsity: float, method: str, pattern: str,
          workdir: Path) -> tuple[dict[str, Path], dict]:
    """The four models, saved in ``workdir``, and the sparse int8 run's quantize report."""
    proto = onnx.load(str(model))
    sidecar = model.parent / SIDECAR_NAME
    if sidecar.is_file():  # the saved models are read with the dense model's preprocessing
        shutil.copyfile(sidecar, workdir / SIDECAR_NAME)
    data = load_calibration(calib, proto, model_path=model)
    feeds = list(data.feeds("train", 64))
    n, kept = 0, []
    for feed in feeds:  # the samples --quantize calibrates with
        if n >= QUANTIZE_SAMPLES:
            break
        kept.append(feed)
        n += len(next(iter(feed.values())))
    paths = {"dense fp32": model, "sparse fp32": workdir / "sparse.onnx", "dense int8 (peer)": workdir / "peer.onnx",
             "sparse int8": workdir / "sparse-int8.onnx"}
    onnx.save_model(peer_int8(proto, Calibration(kept, workdir), workdir), str(paths["dense int8 (peer)"]))
    common = dict(sparsity=sparsity, method=method, pattern=pattern, min_agreement=0.0)
    prune(model, paths["sparse fp32"], calib, PruneConfig(**common), progress=False, force=True)
    report = prune(model, paths["sparse int8"], calib, PruneConfig(**common, quantize="int8"), progress=False,
                   force=True).report
    return paths, report["quantize"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--calib", required=True)
    parser.add_argument("--data", default=None, help="labelled image folder: top-1 accuracy of each model")
    parser.add_argument("--limit", type=int, default=None, help="evaluate on at most this many images")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--method", default="magnitude")
    parser.add_argument("--pattern", default="unstructured")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        paths, quant = build(args.model, args.calib, args.sparsity, args.method, args.pattern, Path(tmp))
        proto = onnx.load(str(args.model))
        feed = next(load_calibration(args.calib, proto, model_path=args.model, max_samples=64).feeds("selection", 64))
        rows = latency_table(paths, feed, batches=tuple(args.batches), threads=tuple(args.threads),
                             passes=args.passes)
        sizes = {label: {"bytes": files_size(p), "zip_bytes": zip_size(*model_files(p))} for label, p in paths.items()}
        accuracy = {}
        if args.data:
            from onnxsparse.evaluate import evaluate

            accuracy = {label: evaluate(p, args.data, limit=args.limit).top1 for label, p in paths.items()}
    dense = sizes["dense fp32"]["bytes"]
    print(f"{args.model} at {args.method} {args.sparsity:g} ({args.pattern}); int8 choices: "
          f"{'applied' if quant['applied'] else 'not applied'}, {quant['calibration']['chosen']} calibration, "
          f"{quant['op_types']['chosen']} op types, kept float: "
          + (", ".join(f"{k['node']} ({k['for']})" for k in quant["kept_float"]) or "none"))
    print()
    print("| model | top-1 | bytes | zip bytes | zip / dense fp32 |")
    print("|---|---|---|---|---|")
    for label, size in sizes.items():
        top1 = f"{100 * accuracy[label]:.2f}" if accuracy.get(label) is not None else "-"
        print(f"| {label} | {top1} | {size['bytes']:,} | {size['zip_bytes']:,} | {size['zip_bytes'] / dense:.3f} |")
    print()
    print("| model | batch | threads | median ms | p90 ms | runs | x dense fp32 |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['batch']} | {row['threads']} | {row['median_ms']:.3f} | {row['p90_ms']:.3f} "
              f"| {row['runs']} | {row['ratio']:.2f} |")
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": machine(), "sizes": sizes, "accuracy": accuracy,
                                         "latency": rows, "quantize": quant}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
