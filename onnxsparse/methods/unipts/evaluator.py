"""The allocation search's fitness: an allocation (zeros per layer) scored on the student, in a statistics-correction
mode the caller names."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from onnxsparse.device import oom_phase
from onnxsparse.graph import PrunableLayer
from onnxsparse.methods.scoring import AgreementScorer
from onnxsparse.methods.unipts.candidate import Candidate, materialise
from onnxsparse.metrics import Agreement
from onnxsparse.signals import Signals
from onnxsparse.sparsity.correction import apply_correction, check_correction_mode, dense_channel_stats


class FitnessEvaluator:
    """Scores an allocation on the student in place: the dense candidate materialised, magnitude-pruned, corrected
    in the given mode, scored.

    The dense student is captured once (:attr:`dense`) and the magnitude order of every layer is sorted once; an
    allocation costs one in-place prune, a statistics correction (BatchNorm re-estimation on the fitness samples
    where the graph has BatchNorm, per-channel correction elsewhere, nothing in mode "none") and one forward pass
    over the fitness samples, scored against teacher outputs computed once.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        layers: Sequence[PrunableLayer],
        batches: list[tuple[torch.Tensor, ...]],
        *,
        signals: Signals,
        has_batchnorm: bool,
        channel_inputs: tuple[torch.Tensor, ...] | None,
        autocast: Callable[[], object],
    ):
        self.student = student
        self.teacher = teacher
        self.layers = list(layers)
        self.batches = batches
        self.signals = Signals.of(signals)
        self.has_batchnorm = has_batchnorm
        self.channel_inputs = channel_inputs
        self._dense_stats = None  # the teacher's channel statistics on channel_inputs, computed at the first fit
        self.autocast = autocast
        # [allocations, seconds] per correction mode: an allocation's cost depends on its mode (the BatchNorm and
        # channel fits cost forwards of their own), and the search runs in one mode only
        self.timings: dict[str, list[float]] = {}
        with torch.no_grad():
            self.dense = Candidate.capture(student, "dense")
            self.orders = {
                layer.name: torch.argsort(layer.weight.get(student).detach().abs().flatten(), stable=True)
                for layer in self.layers
            }
        self.scorer = AgreementScorer(teacher, lambda: self.batches, signals=self.signals, autocast=autocast)

    @property
    def n_samples(self) -> int:
        return sum(b[0].shape[0] for b in self.batches)

    @torch.no_grad()
    def prune(self, zeros: Sequence[int]) -> dict[str, torch.Tensor]:
        """Materialise the dense candidate, then zero the ``zeros[l]`` smallest of each layer. Returns the masks."""
        materialise(self.dense, self.student)
        masks = {}
        for layer, z in zip(self.layers, zeros):
            w = layer.weight.get(self.student)
            mask = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
            mask[self.orders[layer.name][: int(z)]] = False
            w.view(-1).masked_fill_(~mask, 0)
            masks[layer.name] = mask.view_as(w)
        return masks

    @torch.no_grad()
    def apply_masks(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Materialise the dense candidate, then zero what ``masks`` (True = kept) prune."""
        materialise(self.dense, self.student)
        for layer in self.layers:
            w = layer.weight.get(self.student)
            w.masked_fill_(~masks[layer.name].to(w.device), 0)
        return masks

    def score_masks(self, masks: dict[str, torch.Tensor], mode: str) -> Agreement:
        """Fitness of fixed masks (an N:M pattern): prune, correct in ``mode``, score."""
        self.apply_masks(masks)
        self.correct(mode)
        return self.score()

    @torch.no_grad()
    def correct(self, mode: str):
        """The statistics correction ``mode`` (:func:`onnxsparse.sparsity.correction.apply_correction`) applied to
        the student; "none" leaves it as it is."""
        if check_correction_mode(mode) == "none":
            return None
        with self.autocast(), oom_phase("statistics correction"):
            if self._dense_stats is None and self.channel_inputs is not None:
                self._dense_stats = dense_channel_stats(self.teacher, self.layers, self.channel_inputs)
            return apply_correction(
                mode, self.student, self.teacher, self.layers,
                bn_batches=self.batches if self.has_batchnorm else None,
                channel_inputs=self.channel_inputs, dense=self._dense_stats,
            )

    def score(self) -> Agreement:
        return self.scorer(self.student)

    def __call__(self, zeros: Sequence[int], mode: str) -> Agreement:
        """Fitness of the allocation ``zeros`` under the correction ``mode``."""
        start = time.perf_counter()
        self.prune(zeros)
        self.correct(mode)
        agreement = self.score()
        timing = self.timings.setdefault(mode, [0, 0.0])
        timing[0] += 1
        timing[1] += time.perf_counter() - start
        return agreement

    def seconds_per_candidate(self, mode: str) -> float:
        """Mean seconds of an allocation in correction ``mode`` (of every allocation until one was timed in that
        mode)."""
        count, seconds = self.timings.get(mode) or [sum(t) for t in zip(*self.timings.values())] or (0, 0.0)
        return seconds / max(count, 1)
