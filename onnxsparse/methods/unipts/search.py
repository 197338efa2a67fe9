"""Reducing-regrowing sparsity allocation (UniPTS section 2): genome -> layer sparsities, fitness, evolution.

Genome ``g`` (one real per prunable layer) -> sparsities::

    s_l = P + r - R * softmax(g)_l / n_l,   R = r * N      (reduce every layer past P, regrow R weights)

which sums to ``P * N`` zeros exactly. Clamping into ``[0, s_max]`` is followed by a common shift of every
unclamped layer (water-filling: the ``delta`` with ``sum clip(s_l + delta, 0, s_max) n_l = P N``), then the
zeros are made integers by largest remainders, so the integer zero counts sum to ``round(P N)`` exactly and
every layer is within one weight of its continuous share.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from onnxsparse.device import oom_phase
from onnxsparse.distributed import DistContext
from onnxsparse.graph import PrunableLayer
from onnxsparse.signals import Signals
from onnxsparse.metrics import Agreement
from onnxsparse.methods.scoring import AgreementScorer
from onnxsparse.sparsity.correction import apply_correction, check_correction_mode, dense_channel_stats
from onnxsparse.state import copy_state, load_state
from onnxsparse.sparsity.masks import zeros_for

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------
# genome -> sparsities
# --------------------------------------------------------------------------------------------------------
def softmax(g: np.ndarray) -> np.ndarray:
    z = np.exp(g - np.max(g))
    return z / z.sum()


def reduce_regrow(genome: Sequence[float], numels: Sequence[int], target: float, regrow: float) -> np.ndarray:
    """Unclamped layer sparsities ``P + r - r N softmax(g)_l / n_l`` (may leave [0, 1])."""
    n = np.asarray(numels, dtype=np.float64)
    g = np.asarray(genome, dtype=np.float64)
    return target + regrow - regrow * n.sum() * softmax(g) / n


def fit_to_target(s: np.ndarray, numels: Sequence[int], target: float, s_max) -> np.ndarray:
    """Clamp ``s`` into ``[0, s_max]`` keeping ``sum s_l n_l = target * N``: ``clip(s + delta, 0, s_max)``.

    ``s_max`` is one cap or one per layer. ``delta`` solves a monotone piecewise-linear equation; it is found
    exactly from the sorted breakpoints. Caps whose total cannot hold ``target * N`` zeros are raised by a
    common amount until they can (at worst to ``target`` everywhere: the uniform allocation).
    """
    n = np.asarray(numels, dtype=np.float64)
    s = np.asarray(s, dtype=np.float64)
    cap = feasible_caps(s_max, numels, target)
    if np.all((s >= 0) & (s <= cap)):
        return s.copy()
    want = target * n.sum()

    def total(delta: float) -> float:
        return float((np.clip(s + delta, 0.0, cap) * n).sum())

    points = np.unique(np.concatenate([-s, cap - s]))
    values = np.array([total(d) for d in points])
    # total() rises from 0 (all at 0) to sum(cap * n) (all at their caps) over the breakpoints
    i = int(np.searchsorted(values, want, side="left"))
    if i == 0:
        delta = float(points[0])
    elif i >= len(points):
        delta = float(points[-1])
    else:
        d0, d1, v0, v1 = points[i - 1], points[i], values[i - 1], values[i]
        delta = float(d0 if v1 == v0 else d0 + (want - v0) * (d1 - d0) / (v1 - v0))
    return np.clip(s + delta, 0.0, cap)


def feasible_caps(s_max, numels: Sequence[int], target: float) -> np.ndarray:
    """Per-layer caps (a scalar cap broadcast) raised, where needed, so that ``sum cap_l n_l >= target N``."""
    n = np.asarray(numels, dtype=np.float64)
    cap = np.broadcast_to(np.asarray(s_max, dtype=np.float64), n.shape).copy()
    cap = np.maximum(cap, 0.0)
    want = target * n.sum()
    if (cap * n).sum() >= want - 1e-9:
        return cap
    # raise the lowest caps first (water-filling from below) until the total fits; never above max(target, cap)
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if (np.maximum(cap, mid) * n).sum() >= want:
            hi = mid
        else:
            lo = mid
    return np.maximum(cap, hi)


def integer_zeros(s: np.ndarray, numels: Sequence[int], target: float, s_max) -> np.ndarray:
    """Integer zeros per layer summing to ``round(target * N)``, each within one weight of ``s_l n_l``."""
    n = np.asarray(numels, dtype=np.int64)
    total = int(round(target * int(n.sum())))
    real = np.asarray(s, dtype=np.float64) * n
    top = feasible_caps(s_max, numels, target) * n
    cap = np.minimum(n, np.floor(top + 1e-9).astype(np.int64))
    if int(cap.sum()) < total:  # caps round down everywhere: let layers at the cap round up by one
        cap = np.minimum(n, np.ceil(top - 1e-9).astype(np.int64))
    zeros = np.clip(np.floor(real + 1e-9).astype(np.int64), 0, cap)
    short = total - int(zeros.sum())
    frac = real - zeros
    if short > 0:
        for i in sorted(range(len(n)), key=lambda j: (-frac[j], j)):
            if short == 0:
                break
            if zeros[i] < cap[i]:
                zeros[i] += 1
                short -= 1
        while short > 0:  # not reached for feasible targets; kept so the total is always exact
            room = np.flatnonzero(zeros < n)
            i = room[int(np.argmax((real - zeros)[room]))]
            zeros[i] += 1
            short -= 1
    elif short < 0:
        for i in sorted(range(len(n)), key=lambda j: (frac[j], j)):
            if short == 0:
                break
            if zeros[i] > 0:
                zeros[i] -= 1
                short += 1
    return zeros


def genome_to_zeros(genome, numels, target: float, regrow: float, s_max) -> np.ndarray:
    s = fit_to_target(reduce_regrow(genome, numels, target, regrow), numels, target, s_max)
    return integer_zeros(s, numels, target, s_max)


def zeros_to_sparsities(zeros: np.ndarray, layers: Sequence[PrunableLayer]) -> dict[str, float]:
    out = {}
    for z, layer in zip(zeros, layers):
        s = int(z) / layer.numel
        assert zeros_for(s, layer.numel) == int(z)
        out[layer.name] = s
    return out


def sparsities_to_zeros(sparsities: dict[str, float], layers: Sequence[PrunableLayer]) -> np.ndarray:
    return np.array([zeros_for(sparsities[layer.name], layer.numel) for layer in layers], dtype=np.int64)


# --------------------------------------------------------------------------------------------------------
# fitness
# --------------------------------------------------------------------------------------------------------
class FitnessEvaluator:
    """Scores an allocation on the student in place: restore dense snapshot, magnitude-prune, correct, score.

    The dense weights are saved once (one snapshot of every parameter and buffer) and the magnitude order
    of every layer is sorted once; a candidate costs one in-place prune, a statistics correction (BatchNorm
    re-estimation on the fitness samples where the graph has BatchNorm, per-channel correction elsewhere)
    and one forward pass over the fitness samples, scored against teacher outputs computed once.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        layers: Sequence[PrunableLayer],
        batches: list[tuple[torch.Tensor, ...]],
        *,
        signals: Signals,
        correction: str,
        has_batchnorm: bool,
        channel_inputs: tuple[torch.Tensor, ...] | None,
        autocast: Callable[[], object],
    ):
        self.student = student
        self.teacher = teacher
        self.layers = list(layers)
        self.batches = batches
        self.signals = Signals.of(signals)
        # the statistics-correction mode applied before scoring (sparsity.correction.apply_correction)
        self.mode = check_correction_mode(correction)
        self.has_batchnorm = has_batchnorm
        self.channel_inputs = channel_inputs
        self._dense_stats = None  # the teacher's channel statistics on channel_inputs, computed at the first fit
        self.autocast = autocast
        # [candidates, seconds] per correction mode: a candidate's cost depends on its mode (the BatchNorm and
        # channel fits cost forwards of their own), and the search runs in one mode only
        self.timings: dict[str, list[float]] = {}
        with torch.no_grad():
            self.snapshot = copy_state(student)
            self.orders = {
                layer.name: torch.argsort(layer.weight.get(student).detach().abs().flatten(), stable=True)
                for layer in self.layers
            }
        self.scorer = AgreementScorer(teacher, lambda: self.batches, signals=self.signals, autocast=autocast)

    def restore(self) -> None:
        load_state(self.student, self.snapshot)

    @property
    def n_samples(self) -> int:
        return sum(b[0].shape[0] for b in self.batches)

    @torch.no_grad()
    def prune(self, zeros: Sequence[int]) -> dict[str, torch.Tensor]:
        """Restore the dense weights, then zero the ``zeros[l]`` smallest of each layer. Returns the masks."""
        self.restore()
        masks = {}
        for layer, z in zip(self.layers, zeros):
            w = layer.weight.get(self.student)
            mask = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
            mask[self.orders[layer.name][: int(z)]] = False
            w.view(-1).masked_fill_(~mask, 0)
            masks[layer.name] = mask.view_as(w)
        return masks

    def _key(self, layer: PrunableLayer) -> str:
        return f"{layer.weight.module_path}.{layer.weight.attr}" if layer.weight.module_path else layer.weight.attr

    @torch.no_grad()
    def restore_pruned(self, masks: dict[str, torch.Tensor]) -> None:
        """Give the pruned weights their dense values back (kept weights, biases, statistics unchanged)."""
        for layer in self.layers:
            w = layer.weight.get(self.student)
            dense = self.snapshot[self._key(layer)]
            w.copy_(torch.where(masks[layer.name], w, dense))

    @torch.no_grad()
    def apply_masks(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Restore the dense weights, then zero what ``masks`` (True = kept) prune."""
        self.restore()
        for layer in self.layers:
            w = layer.weight.get(self.student)
            w.masked_fill_(~masks[layer.name].to(w.device), 0)
        return masks

    def score_masks(self, masks: dict[str, torch.Tensor]) -> Agreement:
        """Fitness of fixed masks (an N:M pattern): prune, correct, score."""
        self.apply_masks(masks)
        self.correct()
        return self.score()

    @torch.no_grad()
    def correct(self):
        if self.mode == "none":
            return None
        with self.autocast(), oom_phase("statistics correction"):
            if self._dense_stats is None and self.channel_inputs is not None:
                self._dense_stats = dense_channel_stats(self.teacher, self.layers, self.channel_inputs)
            return apply_correction(
                self.mode, self.student, self.teacher, self.layers,
                bn_batches=self.batches if self.has_batchnorm else None,
                channel_inputs=self.channel_inputs, dense=self._dense_stats,
            )

    def score(self) -> Agreement:
        return self.scorer(self.student)

    def __call__(self, zeros: Sequence[int]) -> Agreement:
        start = time.perf_counter()
        self.prune(zeros)
        self.correct()
        agreement = self.score()
        timing = self.timings.setdefault(self.mode, [0, 0.0])
        timing[0] += 1
        timing[1] += time.perf_counter() - start
        return agreement

    @property
    def seconds_per_candidate(self) -> float:
        """Mean seconds of a candidate in the current correction mode (of every candidate until one was timed
        in that mode)."""
        count, seconds = self.timings.get(self.mode) or [sum(t) for t in zip(*self.timings.values())] or (0, 0.0)
        return seconds / max(count, 1)


# --------------------------------------------------------------------------------------------------------
# evolution
# --------------------------------------------------------------------------------------------------------
@dataclass
class SearchResult:
    genome: np.ndarray
    zeros: np.ndarray
    fitness: float
    details: dict
    history: list[dict] = field(default_factory=list)
    evaluations: int = 0
    generations: int = 0


class EvolutionarySearch:
    """Population of genomes: the all-equal genome + uniform random ones; per generation keep the
    ``parents`` fittest, make ``crossover`` children (the all-equal genome + uniform crossovers of two random
    parents), ``mutation`` children (each gene with probability ``mutation_prob``: ``g * (1 + N(0, 1))``)
    and fill the population with fresh random genomes, which are evaluated (not thrown away).

    Fitness is cached per distinct allocation (integer zero counts), so repeated genomes cost nothing.
    The best allocation ever evaluated is returned.
    """

    def __init__(self, evaluate: Callable[[np.ndarray], Agreement], numels: Sequence[int], *, target: float,
                 regrow: float, s_max, population: int, parents: int, crossover: int, mutation: int,
                 mutation_prob: float, rng: np.random.Generator, dist: DistContext | None = None):
        self.evaluate = evaluate
        # every rank draws the same genomes (same rng seed), scores its share, and receives all the scores
        self.dist = dist or DistContext()
        self.numels = list(numels)
        self.length = len(self.numels)
        self.target, self.regrow, self.s_max = target, regrow, s_max
        self.population, self.parents = population, parents
        self.crossover, self.mutation, self.mutation_prob = crossover, mutation, mutation_prob
        self.rng = rng
        self.cache: dict[bytes, tuple[float, dict]] = {}
        self.best: SearchResult | None = None
        self.history: list[dict] = []

    def zeros(self, genome: np.ndarray) -> np.ndarray:
        return genome_to_zeros(genome, self.numels, self.target, self.regrow, self.s_max)

    def fitness(self, genome: np.ndarray) -> float:
        return self.fitness_all([genome])[0]

    def fitness_all(self, genomes: Sequence[np.ndarray]) -> list[float]:
        """Scores of ``genomes``: the allocations not cached yet are dealt round-robin over the ranks, each
        rank scores its share, and the scores are all-gathered, so every rank ends with the same cache."""
        zeros = [self.zeros(g) for g in genomes]
        todo: list[np.ndarray] = []
        for z in zeros:
            if z.tobytes() not in self.cache and not any(np.array_equal(z, t) for t in todo):
                todo.append(z)
        mine = []
        for i in range(self.dist.rank, len(todo), self.dist.world_size):
            agreement = self.evaluate(todo[i])
            mine.append((i, agreement.score, agreement.as_dict()))
        for share in self.dist.all_gather_objects(mine):
            for i, score, details in share:
                self.cache[todo[i].tobytes()] = (float(score), details)
        scores = []
        for genome, z in zip(genomes, zeros):  # population order: the same best as scoring one by one
            score, details = self.cache[z.tobytes()]
            if self.best is None or score > self.best.fitness:
                self.best = SearchResult(genome.copy(), z, score, details)
            scores.append(score)
        return scores

    def equal(self) -> np.ndarray:
        return np.full(self.length, self.target, dtype=np.float64)  # any constant: softmax is uniform

    def random(self, k: int) -> list[np.ndarray]:
        return [self.rng.random(self.length) for _ in range(max(k, 0))]

    def initial(self) -> list[np.ndarray]:
        return [self.equal(), *self.random(self.population - 1)]

    def children(self, parents: list[np.ndarray]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        if self.crossover > 0:
            out.append(self.equal())
        while len(out) < self.crossover:
            if len(parents) >= 2:
                i, j = self.rng.choice(len(parents), 2, replace=False)
                pick = self.rng.integers(0, 2, self.length).astype(bool)
                out.append(np.where(pick, parents[i], parents[j]))
            else:
                out.append(parents[0].copy())
        for _ in range(self.mutation):
            parent = parents[int(self.rng.integers(len(parents)))]
            hit = self.rng.random(self.length) < self.mutation_prob
            out.append(np.where(hit, parent * (1.0 + self.rng.standard_normal(self.length)), parent))
        out.extend(self.random(self.population - len(out)))
        return out

    def run(self, generations: int, *, progress=None, budget_s: float | None = None) -> SearchResult:
        """Evaluate ``generations`` generations (fewer when ``budget_s`` seconds would be exceeded)."""
        start = time.perf_counter()
        # rank 0's plan holds for all (each rank timed its own evaluations)
        generations = int(self.dist.broadcast_float(generations))
        population = self.initial()
        done = 0
        for gen in range(generations):
            scores = self.fitness_all(population)
            done += 1
            finite = [s for s in scores if math.isfinite(s)]
            self.history.append({
                "generation": gen,
                "best": max(scores),
                "mean": float(np.mean(finite)) if finite else float("-inf"),
                "best_so_far": self.best.fitness,
                "evaluated": len(self.cache),
                "seconds": round(time.perf_counter() - start, 3),
            })
            if progress is not None:
                progress.update(1)
                progress.set_postfix(best=f"{self.best.fitness:.4g}")
            if gen == generations - 1:
                break
            elapsed = time.perf_counter() - start
            over = budget_s is not None and elapsed / done * (done + 1) > budget_s
            if self.dist.broadcast_float(float(over)) > 0:
                logger.info("allocation search stopped after %d generations (time budget)", done)
                break
            order = np.argsort(-np.asarray(scores), kind="stable")
            parents = [population[i] for i in order[: self.parents]]
            population = self.children(parents)
        assert self.best is not None
        self.best.history = self.history
        self.best.evaluations = len(self.cache)
        self.best.generations = done
        return self.best
