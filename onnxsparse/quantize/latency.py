"""onnxruntime CPU latency: median of repeated runs, warm-up excluded, with a fixed thread count.

``measure_latency`` is what the quantize stage times its candidates with (batch 1, one intra-op thread) and
what ``benchmarks/int8.py`` builds its table from (batch 1 and 32, 1 and 2 threads). The clock is a parameter
so that decisions built on timings can be tested with a scripted clock.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnxruntime as ort

from onnxsparse.validate import int_at_least

Clock = Callable[[], float]


@dataclass(frozen=True)
class Latency:
    median_ms: float
    p90_ms: float
    runs: int
    warmup: int
    batch: int
    threads: int

    def as_dict(self) -> dict:
        return asdict(self)


def cpu_session(model: onnx.ModelProto | str | os.PathLike, threads: int) -> ort.InferenceSession:
    """A CPU session with every graph optimisation (the deployed form) and ``threads`` intra-op threads."""
    int_at_least(threads, "threads")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def batch_feed(feed: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """``feed`` cut or tiled along the batch axis to exactly ``batch`` samples."""
    out = {}
    for name, array in feed.items():
        reps = -(-batch // array.shape[0])
        out[name] = np.ascontiguousarray(np.concatenate([array] * reps)[:batch]) if reps > 1 else array[:batch]
    return out


def measure_latency(model: onnx.ModelProto | str | os.PathLike, feed: dict[str, np.ndarray], *, threads: int = 1,
                    warmup: int = 5, min_runs: int = 20, min_seconds: float = 0.3, max_runs: int = 1000,
                    clock: Clock = time.perf_counter) -> Latency:
    """Median latency of ``model`` on ``feed`` (its batch as given): ``warmup`` untimed runs, then at least
    ``min_runs`` timed runs and at least ``min_seconds`` of them (at most ``max_runs``)."""
    session = cpu_session(model, threads)
    names = [o.name for o in session.get_outputs()]
    for _ in range(warmup):
        session.run(names, feed)
    times: list[float] = []
    spent = 0.0
    while len(times) < max_runs and (len(times) < min_runs or spent < min_seconds):
        start = clock()
        session.run(names, feed)
        elapsed = clock() - start
        times.append(elapsed)
        spent += elapsed
    batch = int(next(iter(feed.values())).shape[0]) if feed else 1
    return Latency(statistics.median(times) * 1e3, float(np.percentile(times, 90)) * 1e3, len(times), warmup,
                   batch, threads)


class LatencyMeter:
    """Batch-1 single-thread median latency in milliseconds of a model: what the quantize stage compares."""

    def __init__(self, feed: dict[str, np.ndarray], *, threads: int = 1, clock: Clock = time.perf_counter,
                 **options) -> None:
        self.feed = batch_feed(feed, 1)
        self.threads = threads
        self.clock = clock
        self.options = options
        self.runs = 0

    def __call__(self, model: onnx.ModelProto) -> float:
        result = measure_latency(model, self.feed, threads=self.threads, clock=self.clock, **self.options)
        self.runs = result.runs
        return result.median_ms

    def describe(self) -> str:
        return (f"onnxruntime CPU, batch 1, {self.threads} intra-op thread(s), median of >= "
                f"{self.options.get('min_runs', 20)} runs after {self.options.get('warmup', 5)} warm-up runs")


def latency_table(models: dict[str, onnx.ModelProto | str | os.PathLike], feed: dict[str, np.ndarray], *,
                  batches: tuple[int, ...] = (1, 32), threads: tuple[int, ...] = (1, 2), passes: int = 3,
                  clock: Clock = time.perf_counter, **options) -> list[dict]:
    """Latency of every model at every (batch, threads): ``passes`` interleaved passes over the models, the
    fastest pass of each kept (a noisy neighbour slows every model alike rather than one). One row per model,
    batch and thread count, with the ratio to the first model's latency at the same setting."""
    rows = []
    for batch in batches:
        sized = batch_feed(feed, batch)
        for n in threads:
            best: dict[str, Latency] = {}
            for _ in range(passes):
                for label, model in models.items():
                    result = measure_latency(model, sized, threads=n, clock=clock, **options)
                    if label not in best or result.median_ms < best[label].median_ms:
                        best[label] = result
            reference = next(iter(best.values())).median_ms
            for label, result in best.items():
                rows.append({"model": label, **result.as_dict(), "ratio": result.median_ms / reference})
    return rows
