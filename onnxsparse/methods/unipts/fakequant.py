"""Distillation for int8: the last part of UniPTS training replayed with fake quantization (``--quantize int8``).

Weights are fake-quantized on the grid :func:`onnxsparse.quantize.quantize_int8` gives them (onnxruntime's
per-output-channel symmetric int8: ``scale = max|w| / 127`` computed in float64 and stored as float32,
``round(w / scale)`` half to even), after the sparsity mask, so a pruned zero stays exactly zero. The inputs of the
prunable layers are fake-quantized per tensor to uint8 with the min/max ranges observed on the calibration
samples the quantize stage calibrates with. Both pass gradients straight through (the activations' only within
their range).

The fake-quant candidate continues from the trained student for ``fake_quant_fraction`` of the training
iterations more, on the learning-rate schedule's last part (from its value at ``1 - fraction`` of the run,
cosine to 0) and its epochs' temperature; it is baked and statistics-corrected like the plain one, and handed to
the pipeline as an alternative weight set: the quantize stage keeps whichever int8 model the selection split
finds closer to the dense model (:func:`onnxsparse.pipeline._quantize`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from onnxsparse.graph import PrunableLayer
from onnxsparse.methods.base import PruneContext
from onnxsparse.methods.scoring import FixedBatches
from onnxsparse.methods.unipts.candidate import Candidate, materialise
from onnxsparse.methods.unipts.dst import TrainPlan, lr_at, train

logger = logging.getLogger(__name__)

ALTERNATIVE = "fake-quant"  # the name of the alternative weight set in MethodResult.alternatives
RANGE_SAMPLES = 256  # as pipeline.QUANTIZE_SAMPLES: the training samples the int8 activation ranges come from
_TINY32 = float(np.finfo(np.float32).tiny)


def int8_weight_scale(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """onnxruntime's per-channel symmetric int8 scale of ``weight`` along ``axis`` (shaped to broadcast):
    ``max|w| / 127`` in float64, stored as float32; 1.0 for an all-zero channel."""
    dims = [d for d in range(weight.dim()) if d != axis]
    absmax = weight.detach().abs().amax(dim=dims, keepdim=True) if dims else weight.detach().abs()
    scale = absmax.double() * 2.0 / 254.0
    return torch.where(scale < _TINY32, torch.ones_like(scale), scale).to(torch.float32)


def fake_quant_weight(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """``weight`` on its int8 grid (dequantized), gradient straight through: equal to onnxruntime's
    DequantizeLinear of the int8 weight it makes from ``weight``; zeros stay exactly zero."""
    scale = int8_weight_scale(weight, axis)
    grid = torch.clamp(torch.round(weight.detach().float() / scale), -128, 127) * scale
    return weight + (grid.to(weight.dtype) - weight).detach()


def activation_qparams(low: float, high: float) -> tuple[float, int]:
    """onnxruntime's uint8 asymmetric (scale, zero point) of the range [low, high] (zero always inside it)."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / 255.0
    if scale < _TINY32:
        return 1.0, 0
    return float(np.float32(scale)), int(np.clip(round(-low / scale), 0, 255))


class FakeQuantWeight(nn.Module):
    """Parametrization after the sparsity mask: the masked weight on its int8 grid."""

    def __init__(self, axis: int, scale: float = 1.0) -> None:
        super().__init__()
        self.axis = axis
        self.scale = scale  # Gemm's alpha: the ONNX weight is the torch one divided by it

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0:
            return fake_quant_weight(weight, self.axis)
        return fake_quant_weight(weight / self.scale, self.axis) * self.scale


@dataclass
class FakeQuant:
    """Fake quantization attached to a student: weight parametrizations and activation hooks, removable."""

    ranges: dict[str, tuple[float, float]]  # input range per layer module path
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> why its weight is not fake-quantized
    _owners: list[tuple[nn.Module, str]] = field(default_factory=list)
    _hooks: list = field(default_factory=list)

    def attach(self, student: nn.Module, layers: list[PrunableLayer]) -> None:
        for layer in layers:
            owner, attr = layer.weight.owner(student), layer.weight.attr
            axis = layer.out_axis_weight
            if axis is None or layer.weight.layout.perm is not None or layer.weight.layout.onnx_dtype is not None:
                self.skipped[layer.name] = "no output-channel axis that maps one to one onto the ONNX weight's"
                continue
            parametrize.register_parametrization(owner, attr, FakeQuantWeight(axis, layer.weight.layout.scale))
            self._owners.append((owner, attr))
        for path, (low, high) in self.ranges.items():
            scale, zero_point = activation_qparams(low, high)
            module = student.get_submodule(path) if path else student
            self._hooks.append(module.register_forward_pre_hook(_input_hook(scale, zero_point)))

    def detach(self) -> None:
        for owner, attr in self._owners:
            del owner.parametrizations[attr][-1]  # the mask below it stays
        for hook in self._hooks:
            hook.remove()
        self._owners.clear()
        self._hooks.clear()


def _input_hook(scale: float, zero_point: int):
    def hook(module, args):
        if not args or not torch.is_tensor(args[0]) or not args[0].is_floating_point():
            return None
        x = args[0]
        q = torch.fake_quantize_per_tensor_affine(x.float(), scale, zero_point, 0, 255).to(x.dtype)
        return (q, *args[1:])

    return hook


@torch.no_grad()
def observe_ranges(ctx: PruneContext, student: nn.Module, samples: int = RANGE_SAMPLES) -> dict[str, tuple[float, float]]:
    """Min and max of the first input of every prunable layer's module over the first ``samples`` training
    samples (the student in eval mode): the MinMax ranges of those activations."""
    ranges: dict[str, list[float]] = {}
    hooks = []
    for path in dict.fromkeys(layer.module_path for layer in ctx.layers):
        def record(module, args, path=path):
            if args and torch.is_tensor(args[0]) and args[0].is_floating_point():
                x = args[0].detach().float()
                low, high = ranges.setdefault(path, [math.inf, -math.inf])
                ranges[path] = [min(low, float(x.min())), max(high, float(x.max()))]

        module = student.get_submodule(path) if path else student
        hooks.append(module.register_forward_pre_hook(record))
    was_training = student.training
    student.eval()
    try:
        for batch in FixedBatches(ctx, "train", min(samples, ctx.calib.n_train), ctx.config.batch_size)():
            student(*batch)
    finally:
        for hook in hooks:
            hook.remove()
        student.train(was_training)
    return {path: (low, high) for path, (low, high) in ranges.items()}


@torch.no_grad()
def baked_state(student: nn.Module, layers: list[PrunableLayer]) -> dict[str, torch.Tensor]:
    """The state dict ``student`` would have with its masks baked (``weight * mask`` in each plain parameter),
    the student left as it is."""
    was_training = student.training
    student.eval()  # the stored masks, not recomputed ones
    try:
        state = dict(Candidate.capture(student, "baked").state)
        for layer in layers:
            prefix = f"{layer.weight.module_path}." if layer.weight.module_path else ""
            inner = f"{prefix}parametrizations.{layer.weight.attr}."
            for key in [k for k in state if k.startswith(inner)]:
                del state[key]
            state[prefix + layer.weight.attr] = layer.weight.get(student).detach().clone()
    finally:
        student.train(was_training)
    return state


class _Shifted:
    """The distillation loss at epochs ``offset`` later: the temperature the schedule's last part had."""

    def __init__(self, loss_fn, offset: int) -> None:
        self.loss_fn, self.offset = loss_fn, offset

    def __getattr__(self, name):
        return getattr(self.loss_fn, name)

    def forward(self, model, student, teacher, batch, epoch):
        return self.loss_fn.forward(model, student, teacher, batch, epoch + self.offset)

    def tau(self, epoch):
        return self.loss_fn.tau(epoch + self.offset)


@dataclass
class FakeQuantRun:
    report: dict | None  # None: --quantize not set
    alternatives: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def last_part_plan(plan: TrainPlan, fraction: float) -> tuple[TrainPlan, int]:
    """The plan of the fake-quant part and its first step in the original run's numbering."""
    iterations = max(1, int(round(fraction * plan.iterations)))
    first = max(plan.iterations - iterations, 0)
    lr = lr_at(first, plan.iterations, plan.warmup, plan.lr)
    return TrainPlan(iterations=iterations, iterations_per_epoch=plan.iterations_per_epoch, warmup=0, lr=lr,
                     momentum=plan.momentum, weight_decay=plan.weight_decay, budget_s=None), first


def train_last_part(ctx: PruneContext, plan: TrainPlan, epoch_batches, loss_fn, *, selection, autocast,
                    freeze_batchnorm: bool, max_grad_norm: float | None, trained_iterations: int) -> FakeQuantRun:
    """With ``--quantize``: the fake-quant candidate from the trained student (which is left as it was)."""
    fraction = ctx.config.unipts.fake_quant_fraction
    if ctx.config.quantize is None:
        return FakeQuantRun(None)
    if fraction == 0 or trained_iterations == 0:
        reason = "fake_quant_fraction is 0" if fraction == 0 else "no training iterations ran"
        return FakeQuantRun({"ran": False, "reason": reason})
    started = time.perf_counter()
    part, first = last_part_plan(plan, fraction)
    offset = first // max(plan.iterations_per_epoch, 1)
    trained = Candidate.capture(ctx.student, "trained")
    fake = FakeQuant(observe_ranges(ctx, ctx.student))
    fake.attach(ctx.student, ctx.layers)
    try:
        before = selection(ctx.student)  # the trained student as int8 would compute it
        result = train(ctx.student, ctx.teacher, lambda epoch: epoch_batches(epoch + offset), _Shifted(loss_fn, offset),
                       part, selection=selection, autocast=autocast, freeze_batchnorm=freeze_batchnorm,
                       max_grad_norm=max_grad_norm, dist=ctx.dist)
        after = selection(ctx.student)
    finally:
        fake.detach()
    baked = baked_state(ctx.student, ctx.layers)
    materialise(trained, ctx.student)
    del trained
    # a fresh unparametrized copy: parametrized modules share their generated class, which baking one would edit
    candidate = ctx.imported.clone_module().to(ctx.device).eval()
    materialise(Candidate("fake-quant", baked), candidate)
    del baked
    correction = ctx.correct(candidate)
    alternatives = {ALTERNATIVE: dict(Candidate.capture(candidate, ALTERNATIVE).state)}
    del candidate
    report = {
        "ran": True, "fraction": fraction, "iterations": result.iterations, "from_step": first, "lr": part.lr,
        "layers": len(ctx.layers) - len(fake.skipped), "weights_skipped": fake.skipped,
        "activation_ranges": {path: list(r) for path, r in fake.ranges.items()},
        "selection_fake_quant_before": before.as_dict(), "selection_fake_quant_after": after.as_dict(),
        "correction": correction.as_dict(), "curve": result.curve, "rollbacks": result.rollbacks,
        "seconds": round(time.perf_counter() - started, 3),
    }
    logger.info("UniPTS fake-quant part: %d iterations from step %d, selection (fake int8) %.4g -> %.4g",
                result.iterations, first, before.score, after.score)
    return FakeQuantRun(report, alternatives)
