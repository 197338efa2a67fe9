"""The interface every pruning method implements, and the registry keyed by method name."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from onnxsparse.checkpoint import RunDir
from onnxsparse.config import PruneConfig
from onnxsparse.device import oom_phase
from onnxsparse.distributed import DistContext
from onnxsparse.errors import OnnxSparseError
from onnxsparse.graph import ImportedModel
from onnxsparse.signals import Signals
from onnxsparse.sparsity.correction import CorrectionChoice, CorrectionReport, choose_correction, correction_modes
from onnxsparse.methods.scoring import AgreementScorer, FixedBatches
from onnxsparse.signals import describe_outputs

if TYPE_CHECKING:
    from onnxsparse.data import CalibrationSet

logger = logging.getLogger(__name__)

FALLBACK_SELECTION_SAMPLES = 256  # training samples that score choices when there is no selection split


@dataclass
class PruneContext:
    """What a method gets: the imported model, a frozen dense teacher, a student to prune in place."""

    imported: ImportedModel
    teacher: nn.Module  # dense, eval mode, no gradients
    student: nn.Module  # starts dense; the method leaves it pruned with plain (unparametrized) weights
    calib: CalibrationSet
    config: PruneConfig
    device: torch.device
    progress: bool = True
    run_dir: RunDir | None = None  # checkpoints of a long run (None: no checkpoints)
    dist: DistContext = field(default_factory=DistContext)  # this process's rank in a torchrun run
    signals: Signals | None = None  # what each output is (methods.signals); None: described on first use
    _scorer: object = field(default=None, init=False, repr=False)

    def output_signals(self) -> Signals:
        if self.signals is None:
            first = next(iter(self.train_batches(min(8, self.calib.n_train))))
            self.signals = describe_outputs(self.imported, self.teacher, first)
        return self.signals

    def selection_scorer(self):
        """Agreement with the teacher on the selection split (the training split when there is none), cached."""
        if self._scorer is None:
            split = "selection" if self.calib.n_selection > 0 else "train"
            n = self.calib.n_selection if split == "selection" else min(self.calib.n_train, FALLBACK_SELECTION_SAMPLES)
            source = FixedBatches(self, split, n, self.config.batch_size)
            self._scorer = AgreementScorer(self.teacher, source, signals=self.output_signals(),
                                           autocast=contextlib.nullcontext)
            self._scorer.split = split if split == "selection" else "train (no selection split)"
        return self._scorer

    @property
    def layers(self):
        return self.imported.layers

    def train_batches(self, batch_size: int | None = None, *, shuffle: bool = False, seed: int | None = None,
                      augment: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
        return self.calib.batches(
            "train", batch_size or self.config.batch_size, shuffle=shuffle,
            seed=self.config.seed if seed is None else seed, augment=augment, device=self.device,
        )

    def correction_inputs(self) -> tuple[torch.Tensor, ...]:
        """The first ``correction_samples`` training samples as one batch on the device, no augmentation."""
        n = min(self.config.correction_samples, self.calib.n_train)
        return tuple(
            torch.from_numpy(self.calib.train[name][:n]).to(self.device) for name in self.calib.input_names
        )

    def correct(self, module: nn.Module | None = None) -> CorrectionChoice:
        """The statistics correction of ``module`` (default: the student) that agrees best with the dense
        model on the selection, "none" included: correction never makes the model worse on the selection.
        ``--no-correction`` applies none."""
        module = self.student if module is None else module
        if not self.config.correction:
            return CorrectionChoice("none", {}, CorrectionReport(), "--no-correction")
        scorer = self.selection_scorer()
        modes = correction_modes(self.imported.has_batchnorm, self.layers)
        with oom_phase("statistics correction"):
            return choose_correction(module, self.teacher, self.layers, modes, bn_batches=self.train_batches,
                                     channel_inputs=self.correction_inputs(), score=lambda: scorer(module).score,
                                     measured_on=scorer.split)


@dataclass
class MethodResult:
    sparsities: dict[str, float]  # allotted per-layer sparsity, {tensor_name: sparsity}
    masks: dict[str, torch.Tensor]  # final masks (True = kept)
    info: dict = field(default_factory=dict)  # method-specific report (search history, training curve, ...)
    # other final weight sets (student state dicts, masks baked) the pipeline may keep instead, by name: UniPTS's
    # fake-quant-trained student with --quantize, chosen by the quantize stage
    alternatives: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


class PruningMethod(Protocol):
    name: str

    def run(self, ctx: PruneContext) -> MethodResult: ...


_REGISTRY: dict[str, Callable[[], PruningMethod]] = {}


def register_method(name: str):
    def deco(factory: Callable[[], PruningMethod]):
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


def get_method(name: str) -> PruningMethod:
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise OnnxSparseError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None


def available_methods() -> list[str]:
    return sorted(_REGISTRY)
