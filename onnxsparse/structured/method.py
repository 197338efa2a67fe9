"""``--pattern channel``: groups, importance, keep counts for the MACs target, refit, and the student's masks.

``--method magnitude``: filter L1, the same keep ratio in every group, consumers masked (the baseline).
``--method reconstruct``: activation importance at the taps, uniform keep ratio, least-squares refit.
``--method unipts``: as reconstruct, with the keep ratio of every group searched label-free (a genome of one
weight per group, fitness = agreement of the refitted, shrunk model with the dense model on calibration samples).

The student torch module receives the masked model's tensors (consumer columns of removed channels zero, kept
columns refitted): it computes exactly what the shrunk ONNX model computes, which the export verification checks.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import torch

from onnxsparse.errors import OnnxSparseError
from onnxsparse.exporter.shrink import shrink
from onnxsparse.structured import select
from onnxsparse.structured.groups import ChannelAnalysis, analyse
from onnxsparse.data.calibration_set import feed_batches

logger = logging.getLogger(__name__)

CHANNEL_METHODS = ("magnitude", "reconstruct", "unipts")
_STAT_SAMPLES = 256
_STAT_BATCH = 16


@dataclass
class ChannelSelection:
    analysis: ChannelAnalysis
    plan: select.ChannelPlan
    kept: dict[int, int]
    info: dict = field(default_factory=dict)
    # what the refit used (the dense model, its tap statistics, the tensors it may write), for distillation to
    # refit the consumers of channels it swaps (--method unipts); distillation releases them
    model: onnx.ModelProto | None = None
    stats: select.TapStats | None = None
    writable: set[str] = field(default_factory=set)

    def macs(self) -> tuple[int, int]:
        return self.analysis.total_macs, int(round(self.analysis.macs_after(self.kept)))


def restrict(analysis: ChannelAnalysis, editable: set[str], excluded: set[str]) -> ChannelAnalysis:
    """Groups whose weights the student cannot carry (untracked, excluded) stay whole."""
    groups = []
    for g in analysis.groups:
        if g.prunable:
            for p in g.params:
                if p.role == "consumer" and p.name not in editable:
                    g = dataclasses.replace(g, prunable=False, reason=f"consumer weight {p.name!r} is not a "
                                            "prunable layer of the imported model", stopped_by=f"node {p.node!r}")
                    break
                if p.role == "producer" and p.name in excluded:
                    g = dataclasses.replace(g, prunable=False, reason=f"weight {p.name!r} excluded (--exclude)",
                                            stopped_by=f"node {p.node!r}")
                    break
        groups.append(g)
    return ChannelAnalysis(groups, analysis.layers, analysis.notes)


def _feeds(calib, n: int, batch: int) -> list[dict[str, np.ndarray]]:
    arrays = {name: a[:n] for name, a in calib.train.items()}
    return list(feed_batches(arrays, calib.dtypes, batch))


class _Fitness:
    """Agreement of a candidate (shrunk, refitted) with the dense model: 1 - SSE / SST of every output."""

    def __init__(self, model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> None:
        self.model, self.feeds = model, feeds
        sess = _session(model)
        self.dense = [np.concatenate(chunks) for chunks in zip(*(sess.run(None, f) for f in feeds))]
        self.sst = [float(np.square(d - d.mean(0)).sum()) + 1e-12 for d in self.dense]

    def __call__(self, candidate: onnx.ModelProto) -> float:
        sess = _session(candidate)
        outs = [np.concatenate(chunks) for chunks in zip(*(sess.run(None, f) for f in self.feeds))]
        return min(1.0 - float(np.square(o - d).sum()) / s for o, d, s in zip(outs, self.dense, self.sst))


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _search(model: onnx.ModelProto, analysis: ChannelAnalysis, scores, stats, target: float, feeds, *,
            writable: set[str], multiple: int, population: int, generations: int, seed: int,
            budget: float | None) -> tuple[dict[int, float], dict]:
    """Per-group keep weights by evolution; the uniform allocation is in the first population."""
    rng = np.random.default_rng(seed)
    ids = [g.index for g in analysis.prunable()]
    fitness = _Fitness(model, feeds)
    started = time.perf_counter()
    cache: dict[tuple, float] = {}

    def evaluate(genome: np.ndarray) -> float:
        kept = select.scale_to_target(analysis, dict(zip(ids, genome)), target, multiple)
        key = tuple(kept[i] for i in ids)
        if key not in cache:
            removed = select.choose(scores, kept)
            plan = select.plan(model, analysis, removed, stats=stats, writable=writable)
            cache[key] = fitness(shrink(plan.apply(model), analysis, removed, check=False))
        return cache[key]

    pop = [np.ones(len(ids))] + [np.exp(rng.normal(0, 0.3, len(ids))) for _ in range(population - 1)]
    scored = sorted(((evaluate(g), i, g) for i, g in enumerate(pop)), key=lambda t: -t[0])
    history = [round(scored[0][0], 6)]
    done = 1
    for _ in range(generations - 1):
        if budget is not None and time.perf_counter() - started > budget:
            break
        parents = [g for _, _, g in scored[: max(2, population // 3)]]
        children = []
        for k in range(population - len(parents)):
            a, b = rng.choice(len(parents), 2, replace=False)
            child = np.where(rng.random(len(ids)) < 0.5, parents[a], parents[b])
            mutate = rng.random(len(ids)) < 0.3
            child = child * np.exp(np.where(mutate, rng.normal(0, 0.3, len(ids)), 0.0))
            children.append(child)
        scored = sorted([(s, i, g) for i, (s, _, g) in enumerate(scored[: len(parents)])]
                        + [(evaluate(g), len(parents) + i, g) for i, g in enumerate(children)], key=lambda t: -t[0])
        history.append(round(scored[0][0], 6))
        done += 1
    best = scored[0][2]
    uniform = cache.get(tuple(select.scale_to_target(analysis, dict.fromkeys(ids, 1.0), target, multiple)[i]
                              for i in ids))
    return dict(zip(ids, best)), {"generations": done, "candidates": len(cache), "best_fitness": scored[0][0],
                                  "uniform_fitness": uniform, "history": history,
                                  "seconds": round(time.perf_counter() - started, 2)}


def select_channels(model: onnx.ModelProto, calib, config, *, editable: set[str], writable: set[str],
                    excluded: set[str] = frozenset()) -> ChannelSelection:
    """The channels to remove for ``config.sparsity`` of the MACs, and the masked model's new tensors.

    ``editable``: weights the student holds as prunable layers (a group whose consumers are not among them stays
    whole); ``writable``: every tensor the student can carry back (a consumer bias outside it is not refitted).
    """
    if config.method not in CHANNEL_METHODS:
        raise OnnxSparseError(f"--method {config.method} is not available with --pattern channel; use one of "
                              f"{', '.join(CHANNEL_METHODS)}")
    shapes = {name: (1,) + tuple(a.shape[1:]) for name, a in calib.train.items()}
    try:
        observed = select.observe_shapes(model, _feeds(calib, 1, 1)[0])
    except Exception as exc:  # noqa: BLE001 - observed shapes only fill gaps of shape inference
        logger.warning("could not observe tensor shapes with onnxruntime (%s); using shape inference alone", exc)
        observed = None
    analysis = restrict(analyse(model, shapes, observed), editable, excluded)
    info: dict = {"groups": len(analysis.groups), "prunable_groups": len(analysis.prunable())}
    if not analysis.prunable():
        raise OnnxSparseError("--pattern channel: no channel group can be removed safely; "
                              + "; ".join(f"{g.producers[0] if g.producers else g.index}: {g.reason}"
                                          for g in analysis.whole()[:5]))
    refit = config.method != "magnitude"
    feeds = _feeds(calib, _STAT_SAMPLES, _STAT_BATCH)
    stats = select.collect(model, analysis, feeds, gram=refit, seed=config.seed) if refit else None
    scores = select.importance(model, analysis, "l1" if not refit else "activation", stats)
    weights = {g.index: 1.0 for g in analysis.prunable()}
    if config.method == "unipts" and config.unipts.search and len(weights) > 1:
        n_fit = min(config.unipts.fitness_samples, 64)
        fit_feeds = _feeds(calib, n_fit, _STAT_BATCH)
        budget = config.unipts.time_budget / 2 if config.unipts.time_budget is not None else None
        weights, info["search"] = _search(model, analysis, scores, stats, config.sparsity, fit_feeds,
                                          writable=writable, multiple=config.channel_multiple,
                                          population=min(config.unipts.population, 10),
                                          generations=min(config.unipts.generations, 6), seed=config.seed,
                                          budget=budget)
    kept = select.scale_to_target(analysis, weights, config.sparsity, config.channel_multiple)
    removed = select.choose(scores, kept)
    plan = select.plan(model, analysis, removed, stats=stats, writable=writable)
    info.update({"importance": "l1" if not refit else "activation", "refit": refit, **plan.info,
                 "removed_channels": sum(len(c) for c in removed.values())})
    if config.method != "unipts":  # only distillation's regrowth refits again; the Gram matrices can be large
        return ChannelSelection(analysis, plan, kept, info)
    return ChannelSelection(analysis, plan, kept, info, model, stats, set(writable))


def apply_to_student(selection: ChannelSelection, tracked, student: torch.nn.Module) -> None:
    """Write the masked model's tensors into the student (by ONNX name, through each tensor's layout)."""
    by_name = {t.source.name: t for t in tracked if not t.shared}
    for name, array in selection.plan.updates.items():
        t = by_name.get(name)
        if t is None:
            raise OnnxSparseError(f"internal error: tensor {name!r} is not tracked by the importer")
        param = t.get(student)
        with torch.no_grad():
            param.copy_(t.layout.to_torch(array).to(param.dtype).reshape(param.shape))
