#!/usr/bin/env python3
"""Dense vs sparse: file sizes, onnxruntime CPU latency/throughput, and 2:4 GEMMs on CUDA.

    python benchmarks/speed.py samples/fashion_mnist/model.onnx --calib samples/fashion_mnist/calib

Prunes MODEL with the magnitude baseline at each ``--variant`` (default: ``0.9`` unstructured and ``2:4``),
saves every variant in both storage formats, then prints markdown tables:

1. storage: file size dense / sparse-initializer, and a zip (deflate) archive of each;
2. onnxruntime on CPU: batch-1 latency (median, p90) and batch-``--batch`` throughput. onnxruntime runs
   sparse weights as dense ones (sparse initializers are densified at load), so expect *no* speed-up from
   unstructured sparsity or 2:4 here: the win is storage;
3. with CUDA only: every GEMM of the 2:4 model (Conv as an im2col GEMM with K laid out (kh, kw, C_in), so
   TensorRT's input-channel groups are consecutive; Gemm/MatMul as is) in fp16, dense ``torch.mm`` against
   ``torch.sparse.to_sparse_semi_structured``, plus a large reference shape. Skipped cleanly without CUDA.

``--model LABEL=PATH`` adds already-pruned models (e.g. a UniPTS output) to the CPU tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import cpu_model  # noqa: E402

logger = logging.getLogger("benchmarks.speed")


# -- machine ------------------------------------------------------------------------------------------------
def machine() -> dict:
    cpu = cpu_model()
    info = {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": ort.__version__, "onnx": onnx.__version__}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["torch"] = info["cuda"] = None
    return info


# -- variants -------------------------------------------------------------------------------------------------
@dataclass
class Variant:
    label: str
    path: Path  # dense storage
    sparse_path: Path | None = None  # sparse-initializer storage
    sparsity: float | None = None


def prune_variants(model: Path, calib: str, variants: list[str], workdir: Path, seed: int) -> list[Variant]:
    from onnxsparse.config import PruneConfig
    from onnxsparse.pipeline import prune

    out = [Variant("dense (original)", model)]
    for spec in variants:
        pattern = spec if ":" in spec else "unstructured"
        sparsity = 1.0 - int(spec.split(":")[0]) / int(spec.split(":")[1]) if ":" in spec else float(spec)
        tag = spec.replace(":", "of").replace(".", "p")
        paths = {}
        for fmt in ("dense", "sparse-initializer"):
            path = workdir / f"magnitude_{tag}_{fmt}.onnx"
            result = prune(model, path, calib, PruneConfig(sparsity=sparsity, method="magnitude", pattern=pattern,
                                                           save_format=fmt, seed=seed, min_agreement=0.0),
                           force=True, progress=False)  # timing only: magnitude at 0.9 fails the default gate
            paths[fmt] = path
        label = f"magnitude {spec}" + (" unstructured" if pattern == "unstructured" else "")
        out.append(Variant(label, paths["dense"], paths["sparse-initializer"], result.achieved_sparsity))
    return out


# -- storage --------------------------------------------------------------------------------------------------
def storage_rows(variants: list[Variant]) -> list[dict]:
    from onnxsparse.exporter.save import files_size, model_files, zip_size

    rows = []
    for v in variants:
        row = {"variant": v.label, "sparsity": v.sparsity, "dense_bytes": files_size(v.path),
               "dense_zip_bytes": zip_size(*model_files(v.path))}
        if v.sparse_path is not None:
            n_sparse = len(onnx.load(str(v.sparse_path), load_external_data=False).graph.sparse_initializer)
            row.update(sparse_bytes=files_size(v.sparse_path), sparse_zip_bytes=zip_size(*model_files(v.sparse_path)),
                       sparse_tensors=n_sparse)
        rows.append(row)
    return rows


# -- onnxruntime on CPU -------------------------------------------------------------------------------------------
def _session(path: Path, threads: int) -> tuple[ort.InferenceSession, float]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    start = time.perf_counter()
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return sess, time.perf_counter() - start


def _feed(sess: ort.InferenceSession, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {}
    for inp in sess.get_inputs():
        shape = [batch if i == 0 and not isinstance(d, int) else (d if isinstance(d, int) else 1)
                 for i, d in enumerate(inp.shape)]
        feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _timed(sess, feeds, seconds: float, min_runs: int) -> list[float]:
    for _ in range(5):
        sess.run(None, feeds)
    times = []
    deadline = time.perf_counter() + seconds
    while len(times) < min_runs or time.perf_counter() < deadline:
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - start)
    return times


def cpu_rows(variants: list[Variant], batch: int, seconds: float, threads: int, rounds: int) -> list[dict]:
    """Latency/throughput per variant; ``rounds`` interleaved passes over all variants, best round kept
    (so a noisy neighbour slows every variant alike rather than one)."""
    rng = np.random.default_rng(0)
    entries = []
    for v in variants:
        for fmt, path in (("dense", v.path), ("sparse-initializer", v.sparse_path)):
            if path is None:
                continue
            sess, load_s = _session(path, threads)
            entries.append({"variant": v.label, "format": fmt, "sess": sess, "load_ms": load_s * 1e3,
                            "lat": [], "thr": []})
    for _ in range(rounds):
        for e in entries:
            f1 = _feed(e["sess"], 1, rng)
            fb = _feed(e["sess"], batch, rng)
            lat = _timed(e["sess"], f1, seconds / 2, 20)
            thr = _timed(e["sess"], fb, seconds / 2, 5)
            e["lat"].append((statistics.median(lat), float(np.percentile(lat, 90))))
            e["thr"].append(batch / statistics.median(thr))
    rows = []
    for e in entries:
        med, p90 = min(e["lat"])
        rows.append({"variant": e["variant"], "format": e["format"], "load_ms": e["load_ms"],
                     "latency_ms_median": med * 1e3, "latency_ms_p90": p90 * 1e3,
                     "throughput_per_s": max(e["thr"]), "batch": batch})
    return rows


# -- CUDA 2:4 GEMMs ---------------------------------------------------------------------------------------------
def gemm_operands(model_path: Path, batch: int) -> list[dict]:
    """``(name, A (M, K) weight as float32, N)`` for each Conv / Gemm / MatMul weight of the model.

    Conv: A is the weight with K ordered (kh, kw, C_in/g) (per group), N = batch * H_out * W_out.
    Gemm / MatMul: A is the weight with K (the reduction dimension) last, N = rows of the activation.
    """
    from onnxsparse.inspect import inspect_model, weight_operand
    from onnxsparse.exporter.writeback import densify

    model = densify(onnx.load(str(model_path)))
    inferred = _infer_with_batch(model, batch)
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)}
    consts = {init.name: init for init in model.graph.initializer}
    layer_axes = {r.tensor: r.nm_axis for r in inspect_model(model)}
    out = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        value = weight_operand(node, consts)
        if value is None:
            continue
        w = numpy_helper.to_array(consts[value]).astype(np.float32)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            group = int(attrs.get("group", 1))
            if group != 1:
                continue  # a grouped conv is `group` small GEMMs; skipped here
            out_shape = shapes.get(node.output[0])
            if not out_shape or 0 in out_shape:
                continue
            a = w.transpose(0, *range(2, w.ndim), 1).reshape(w.shape[0], -1)  # (C_out, kh*kw*C_in)
            n = int(np.prod(out_shape)) // out_shape[1]
        else:
            axis = layer_axes.get(value)
            if axis is None:
                continue
            a = w if axis == 1 else w.T  # reduction (K) last
            in_shape = shapes.get(node.input[0] if value == node.input[1] else node.input[1])
            n = int(np.prod(in_shape)) // a.shape[1] if in_shape and 0 not in in_shape else batch
        out.append({"name": node.name or value, "op": node.op_type, "A": np.ascontiguousarray(a), "N": max(n, 1)})
    return out


def _infer_with_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for inp in fixed.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch
    return onnx.shape_inference.infer_shapes(fixed)


def cuda_rows(model_path: Path, batch: int, reference: list[tuple[int, int, int]]) -> tuple[list[dict], str | None]:
    try:
        import torch
    except ImportError:
        return [], "torch is not installed"
    if not torch.cuda.is_available():
        return [], "no CUDA device: the 2:4 semi-structured GEMM benchmark was skipped"
    try:
        from torch.sparse import to_sparse_semi_structured
    except ImportError:
        return [], f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    major, minor = torch.cuda.get_device_capability(0)
    if major < 8:
        return [], f"{torch.cuda.get_device_name(0)} (sm_{major}{minor}) has no sparse tensor cores (needs sm_80+)"
    torch.backends.cuda.matmul.allow_tf32 = False
    cases = [(op["name"], op["op"], torch.from_numpy(op["A"]), op["N"]) for op in gemm_operands(model_path, batch)]
    gen = torch.Generator().manual_seed(0)
    for m, k, n in reference:  # a synthetic 2:4 weight of a large layer, for scale
        w = torch.randn(m, k, generator=gen)
        keep = torch.zeros_like(w, dtype=torch.bool).view(-1, 4)
        keep.scatter_(1, w.abs().view(-1, 4).topk(2, dim=1).indices, True)
        cases.append((f"reference {m}x{k}x{n}", "synthetic", w * keep.view_as(w), n))
    from onnxsparse.sparsity.patterns import check_nm

    rows = []
    for name, op, a, n in cases:
        row = {"gemm": name, "op": op, "M": a.shape[0], "K": a.shape[1], "N": n}
        if a.shape[1] % 4 or not check_nm(a, 2, 4, 1):
            row["error"] = "not 2:4 along K (layer left dense): no sparse kernel"
            rows.append(row)
            continue
        try:
            row.update(_time_pair(a, n, to_sparse_semi_structured))
        except Exception as exc:  # noqa: BLE001 - report the kernel's refusal for this shape and go on
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        rows.append(row)
    return rows, None


def _pad(x, rows: int, cols: int):
    import torch

    out = torch.zeros(rows, cols, dtype=x.dtype, device=x.device)
    out[: x.shape[0], : x.shape[1]] = x
    return out


def _time_pair(a_cpu, n: int, to_sparse) -> dict:
    """Dense fp16 ``A @ B`` vs 2:4 sparse ``A @ B``; shapes padded up to multiples of 64 (zeros keep 2:4)."""
    import torch

    def up(v: int, to: int = 64) -> int:
        return max(to, -(-v // to) * to)

    m, k = a_cpu.shape
    mp, kp, np_ = up(m), up(k), up(n)
    a = _pad(a_cpu.to("cuda", torch.float16), mp, kp)
    b = torch.randn(kp, np_, device="cuda", dtype=torch.float16)
    a_sparse = to_sparse(a)
    dense_out = a @ b
    sparse_out = a_sparse @ b
    err = float((dense_out.float() - sparse_out.float()).abs().max() / dense_out.float().abs().max().clamp_min(1e-6))

    def bench(fn) -> float:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        reps = 50
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        best = float("inf")
        for _ in range(5):
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) / reps)
        return best

    dense_ms = bench(lambda: a @ b)
    sparse_ms = bench(lambda: a_sparse @ b)
    return {"padded": f"{mp}x{kp}x{np_}", "dense_us": dense_ms * 1e3, "sparse_us": sparse_ms * 1e3,
            "speedup": dense_ms / sparse_ms, "max_rel_err": err}


# -- output ---------------------------------------------------------------------------------------------------
def _kb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024:,.1f} KiB"


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"Machine: {m['cpu']} ({m['cores']} cores), {m['platform']}; onnxruntime {m['onnxruntime']}, "
        f"torch {m['torch']}, CUDA: {m['cuda'] or 'none'}",
        f"Model: `{report['model']}`",
        "",
        "| variant | sparsity | dense file | zip | sparse-initializer file | zip | sparse tensors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["storage"]:
        sp = "-" if r["sparsity"] is None else f"{r['sparsity']:.1%}"
        lines.append(f"| {r['variant']} | {sp} | {_kb(r['dense_bytes'])} | {_kb(r['dense_zip_bytes'])} | "
                     f"{_kb(r.get('sparse_bytes'))} | {_kb(r.get('sparse_zip_bytes'))} | {r.get('sparse_tensors', '-')} |")
    cpu = report["cpu"]
    lines += [
        "",
        f"onnxruntime CPUExecutionProvider, {report['threads'] or 'default'} intra-op threads; best of "
        f"{report['rounds']} interleaved rounds",
        "",
        f"| variant | format | load ms | latency b=1 median ms | p90 ms | throughput b={cpu[0]['batch'] if cpu else '?'} "
        "img/s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in cpu:
        lines.append(f"| {r['variant']} | {r['format']} | {r['load_ms']:.1f} | {r['latency_ms_median']:.3f} | "
                     f"{r['latency_ms_p90']:.3f} | {r['throughput_per_s']:,.0f} |")
    lines.append("")
    if report["cuda_skipped"]:
        lines.append(f"CUDA 2:4 GEMMs: skipped ({report['cuda_skipped']}).")
    else:
        lines += ["2:4 semi-structured GEMMs (fp16, `torch.sparse.to_sparse_semi_structured`), shapes padded to "
                  "multiples of 64", "",
                  "| GEMM | op | M x K x N (padded) | dense us | 2:4 us | speed-up | max rel err |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for r in report["cuda"]:
            if "error" in r:
                lines.append(f"| {r['gemm']} | {r['op']} | {r['M']}x{r['K']}x{r['N']} | - | - | - | {r['error']} |")
            else:
                lines.append(f"| {r['gemm']} | {r['op']} | {r['padded']} | {r['dense_us']:.1f} | {r['sparse_us']:.1f} | "
                             f"{r['speedup']:.2f}x | {r['max_rel_err']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--calib", required=True, help="calibration data for the magnitude pruning (onnxsparse --calib)")
    parser.add_argument("--variant", action="append", dest="variants",
                        help="sparsity (unstructured, e.g. 0.9) or N:M pattern (e.g. 2:4); repeatable")
    parser.add_argument("--model", action="append", dest="extra", default=[], metavar="LABEL=PATH",
                        help="an already-pruned model to time too")
    parser.add_argument("--batch", type=int, default=64, help="throughput batch size (default 64)")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per variant and round (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: default)")
    parser.add_argument("--reference-gemm", action="append", default=None, metavar="MxKxN",
                        help="extra synthetic 2:4 GEMM shape for the CUDA table (default 4096x4096x4096)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the pruned models here")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[%(levelname)s] %(name)s: %(message)s")
    if not args.model.is_file():
        sys.exit(f"error: model not found: {args.model}")
    variants_spec = args.variants or ["0.9", "2:4"]
    reference = [tuple(int(v) for v in s.lower().split("x")) for s in (args.reference_gemm or ["4096x4096x4096"])]

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        variants = prune_variants(args.model, args.calib, variants_spec, workdir, args.seed)
        for extra in args.extra:
            label, _, path = extra.partition("=")
            variants.append(Variant(label, Path(path)))
        report = {"machine": machine(), "model": str(args.model), "threads": args.threads, "rounds": args.rounds,
                  "storage": storage_rows(variants),
                  "cpu": cpu_rows(variants, args.batch, args.seconds, args.threads, args.rounds)}
        nm_variant = next((v for v, s in zip(variants[1:], variants_spec) if s == "2:4"), None)
        if nm_variant is None:
            report["cuda"], report["cuda_skipped"] = [], "no 2:4 variant requested"
        else:
            report["cuda"], report["cuda_skipped"] = cuda_rows(nm_variant.path, args.batch, reference)
    print(markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
