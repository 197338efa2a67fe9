"""Statistics correction after pruning, on calibration data.

* BatchNorm re-estimation where the graph kept BatchNorm: running statistics reset and re-averaged
  (cumulative average) in train-mode forwards without gradients.
* Dense-relative BatchNorm correction: each BatchNorm keeps the dense model's statistics, moved by what
  pruning changed on the calibration data. With ``(m_t, v_t)`` / ``(m_s, v_s)`` the per-channel mean and
  variance of the BatchNorm's input in the dense / pruned model on the same samples and ``(mu, var)`` the dense
  running statistics: ``var' = var * v_s / v_t`` and ``mu' = m_s - (m_t - mu) * sqrt(var' / var)``, so the
  pruned model's normalised output has the dense model's first two moments on the calibration data while the
  statistics the model was trained with stay its reference (a no-op at sparsity 0, whatever the data).
* For layers not followed by BatchNorm (the common BN-folded export): a per-output-channel scale ``a`` and
  shift ``b`` fitted so that the pruned layer's output has the dense layer's per-channel mean and standard
  deviation, then folded into the layer: ``W[c] *= a[c]`` and ``bias[c] = a[c] * bias[c] + b[c]``. Zeros stay
  zeros. Layers are fitted in one forward pass in graph order, so each sees its corrected predecessors.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from onnxsparse.graph import PrunableLayer
from onnxsparse.state import copy_state, load_state
from onnxsparse.validate import one_of

logger = logging.getLogger(__name__)

_EPS = 1e-8


@dataclass
class CorrectionReport:
    batchnorm_layers: int = 0
    batchnorm_samples: int = 0
    channel_layers: list[str] = field(default_factory=list)
    scale_only_layers: list[str] = field(default_factory=list)
    uncorrected_layers: list[str] = field(default_factory=list)
    channel_samples: int = 0

    def as_dict(self) -> dict:
        return {
            "batchnorm_reestimated": self.batchnorm_layers,
            "batchnorm_samples": self.batchnorm_samples,
            "channel_corrected": len(self.channel_layers),
            "channel_scale_only": self.scale_only_layers,
            "uncorrected": self.uncorrected_layers,
            "channel_samples": self.channel_samples,
        }


def _batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]  # noqa: SLF001


# A channel whose re-estimated variance falls below this fraction of its dense variance was silenced by
# pruning: its output is constant either way, and keeping the dense variance stops 1/sqrt(eps) from
# magnifying rounding noise (torch vs onnxruntime) into the next layers.
_SILENT_VAR_RATIO = 1e-4


@torch.no_grad()
def reestimate_batchnorm(module: nn.Module, batches: Iterable[tuple[torch.Tensor, ...]]) -> tuple[int, int]:
    """Reset and re-estimate every BatchNorm's running statistics. Returns (layers, samples seen)."""
    bns = _batchnorms(module)
    if not bns:
        return 0, 0
    dense_var = [bn.running_var.clone() for bn in bns]
    was_training = module.training
    saved = []
    for bn in bns:
        saved.append(bn.momentum)
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average
    module.eval()
    for bn in bns:
        bn.train()
    seen = 0
    try:
        for batch in batches:
            module(*batch)
            seen += batch[0].shape[0]
    finally:
        for bn, momentum in zip(bns, saved):
            bn.momentum = momentum
        module.train(was_training)
        if not was_training:
            module.eval()
    for bn, var in zip(bns, dense_var):
        bn.running_var.copy_(torch.where(bn.running_var < _SILENT_VAR_RATIO * var, var, bn.running_var))
    return len(bns), seen

@contextlib.contextmanager
def submodule_hooks(module: nn.Module, hooks: dict[str, object], *, pre: bool = False):
    """Forward (or forward pre-) hooks on ``module``'s submodules by path, removed on exit."""
    register = "register_forward_pre_hook" if pre else "register_forward_hook"
    handles = [getattr(module.get_submodule(path), register)(hook) for path, hook in hooks.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _channel_stats(out: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = out.detach().movedim(axis, 0).reshape(out.shape[axis], -1).double()
    return x.mean(dim=1), x.std(dim=1, unbiased=False)


def _view(v: torch.Tensor, ndim: int, axis: int) -> list[int]:
    shape = [1] * ndim
    shape[axis] = v.numel()
    return shape


def correctable(layer: PrunableLayer) -> bool:
    return not layer.feeds_batchnorm and layer.out_axis_weight is not None


@torch.no_grad()
def fit_channel_correction(
    student: nn.Module,
    teacher: nn.Module,
    layers: list[PrunableLayer],
    inputs: tuple[torch.Tensor, ...],
    report: CorrectionReport | None = None,
    *,
    dense: ChannelStats | None = None,
) -> CorrectionReport:
    """Fit and fold the per-channel affine correction for every correctable layer (see module docstring);
    ``dense``: the teacher's statistics on ``inputs``, if already computed."""
    report = report or CorrectionReport()
    fitted = fit_channel_affine(student, teacher, layers, inputs, dense=dense)
    return fold_channel_affine(student, layers, fitted, report, int(inputs[0].shape[0]))


ChannelAffine = dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer name -> (scale a, shift b) per channel
ChannelStats = dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer name -> (mean, std) per output channel


@torch.no_grad()
def dense_channel_stats(teacher: nn.Module, layers: list[PrunableLayer], inputs: tuple[torch.Tensor, ...]) -> ChannelStats:
    """Per-channel mean and standard deviation of every correctable layer's output in ``teacher`` on ``inputs``:
    what the channel fit matches. They depend on the teacher and the inputs alone, so a caller correcting many
    candidates on the same inputs (the allocation search, the correction choice) computes them once."""
    dense: ChannelStats = {}

    def teacher_hook(layer: PrunableLayer):
        def hook(_module, _inp, out):
            dense[layer.name] = _channel_stats(out, layer.out_axis_act % out.dim())

        return hook

    targets = [layer for layer in layers if correctable(layer)]
    if targets:
        with submodule_hooks(teacher, {layer.module_path: teacher_hook(layer) for layer in targets}):
            teacher(*inputs)
    return dense


@torch.no_grad()
def fit_channel_affine(
    student: nn.Module,
    teacher: nn.Module,
    layers: list[PrunableLayer],
    inputs: tuple[torch.Tensor, ...],
    *,
    dense: ChannelStats | None = None,
) -> ChannelAffine:
    """The per-channel ``(a, b)`` of every correctable layer, fitted in one forward in graph order (each layer
    sees its corrected predecessors); ``student`` is left unchanged. ``dense``: the teacher's statistics on
    ``inputs`` (:func:`dense_channel_stats`), computed here when not given."""
    targets = [layer for layer in layers if correctable(layer)]
    if not targets:
        return {}
    if dense is None:
        dense = dense_channel_stats(teacher, layers, inputs)

    fitted: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def student_hook(layer: PrunableLayer):
        def hook(_module, _inp, out):
            if layer.name not in dense or layer.name in fitted:
                return None
            axis = layer.out_axis_act % out.dim()
            mean_s, std_s = _channel_stats(out, axis)
            mean_t, std_t = dense[layer.name]
            # A channel the pruning silenced (or a constant dense channel) keeps scale 1: nothing to match.
            degenerate = (std_s < _EPS) | (std_t < _EPS)
            a = torch.where(degenerate, torch.ones_like(std_s), std_t / std_s.clamp_min(_EPS))
            b = mean_t - a * mean_s
            if layer.bias is None:
                b = torch.zeros_like(b)
            fitted[layer.name] = (a, b)
            shape = _view(a, out.dim(), axis)
            return out * a.to(out.dtype).view(shape) + b.to(out.dtype).view(shape)

        return hook

    was_training = student.training
    student.eval()
    try:
        with submodule_hooks(student, {layer.module_path: student_hook(layer) for layer in targets}):
            student(*inputs)
    finally:
        student.train(was_training)

    return fitted


@torch.no_grad()
def fold_channel_affine(student: nn.Module, layers: list[PrunableLayer], fitted: ChannelAffine,
                        report: CorrectionReport, samples: int) -> CorrectionReport:
    """Fold fitted ``(a, b)`` into the layers: ``W[c] *= a[c]``, ``bias[c] = a[c] * bias[c] + b[c]``."""
    report.uncorrected_layers.extend(
        layer.name for layer in layers if not layer.feeds_batchnorm and layer.out_axis_weight is None
    )
    for layer in layers:
        if not correctable(layer):
            continue
        if layer.name not in fitted:
            report.uncorrected_layers.append(layer.name)
            continue
        a, b = fitted[layer.name]
        weight = layer.weight.get(student)
        axis = layer.out_axis_weight
        weight.mul_(a.to(weight.dtype).view(_view(a, weight.dim(), axis)))
        if layer.bias is not None:
            bias = layer.bias.get(student)
            scale = a.to(bias.dtype) if layer.bias_inside else torch.ones_like(bias)
            bias.copy_(bias * scale + b.to(bias.dtype).view(bias.shape))
            report.channel_layers.append(layer.name)
        else:
            report.scale_only_layers.append(layer.name)
    report.channel_samples = samples
    return report


@contextlib.contextmanager
def channel_affine_applied(student: nn.Module, layers: list[PrunableLayer], fitted: ChannelAffine):
    """``student`` computes as if ``fitted`` were folded (forward hooks on the layers' outputs), unchanged after."""

    def hook_for(layer: PrunableLayer):
        a, b = fitted[layer.name]

        def hook(_module, _inp, out):
            shape = _view(a, out.dim(), layer.out_axis_act % out.dim())
            return out * a.to(out.dtype).view(shape) + b.to(out.dtype).view(shape)

        return hook

    with submodule_hooks(student, {layer.module_path: hook_for(layer) for layer in layers if layer.name in fitted}):
        yield


@torch.no_grad()
def relative_batchnorm(student: nn.Module, teacher: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[int, int]:
    """Dense-relative BatchNorm correction (see the module docstring) on one batch. Returns (layers, samples).

    BatchNorms are corrected in execution order during one student forward, so each one sees the corrected
    earlier layers. Teacher and student must have the same module paths (the student is a clone).
    """
    names = [name for name, m in student.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]  # noqa: SLF001
    if not names:
        return 0, 0
    dense: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().movedim(1, 0).reshape(x.shape[1], -1).double()
        return x.mean(dim=1), x.var(dim=1, unbiased=False)

    def teacher_hook(name):
        def hook(_module, args):
            dense[name] = stats(args[0])

        return hook

    with submodule_hooks(teacher, {n: teacher_hook(n) for n in names}, pre=True):
        teacher(*inputs)

    def student_hook(name):
        def hook(module, args):
            if name not in dense:
                return
            m_t, v_t = dense[name]
            m_s, v_s = stats(args[0])
            mu, var = module.running_mean.double(), module.running_var.double()
            # a channel constant in either model has nothing to match: it keeps the dense statistics
            ok = (v_t > _EPS) & (v_s > _EPS)
            new_var = torch.where(ok, var * v_s / v_t.clamp_min(_EPS), var)
            new_mu = torch.where(ok, m_s - (m_t - mu) * torch.sqrt(new_var / var.clamp_min(_EPS)), mu)
            module.running_var.copy_(new_var.to(module.running_var.dtype))
            module.running_mean.copy_(new_mu.to(module.running_mean.dtype))

        return hook

    was_training = student.training
    student.eval()
    try:
        with submodule_hooks(student, {n: student_hook(n) for n in names}, pre=True):
            student(*inputs)
    finally:
        student.train(was_training)
    return len(names), int(inputs[0].shape[0])


# The statistics corrections a run can choose between (:func:`choose_correction`), cheapest first: a tie keeps the
# earlier one, so "none" wins wherever no correction helps.
MODES_BATCHNORM = ("none", "channel", "relative", "reestimate")
MODES_PLAIN = ("none", "channel")


def correction_modes(has_batchnorm: bool, layers: list[PrunableLayer]) -> tuple[str, ...]:
    if has_batchnorm:
        return MODES_BATCHNORM if any(correctable(layer) for layer in layers) else ("none", "relative", "reestimate")
    return MODES_PLAIN


# (student, teacher, channel_inputs, bn_batches) -> (BatchNorm layers, samples), None where its data is not given
_BatchnormStep = Callable[..., "tuple[int, int] | None"]


def _relative_step(student, teacher, channel_inputs, bn_batches) -> tuple[int, int] | None:
    return relative_batchnorm(student, teacher, channel_inputs) if channel_inputs is not None else None


def _reestimate_step(student, teacher, channel_inputs, bn_batches) -> tuple[int, int] | None:
    return reestimate_batchnorm(student, bn_batches()) if bn_batches is not None else None


@dataclass(frozen=True)
class _Mode:
    """What one correction mode does: a BatchNorm step (None: none), then the per-channel fit of the layers not
    followed by BatchNorm, or not."""

    batchnorm: _BatchnormStep | None
    channel_fit: bool


_MODES = {
    "none": _Mode(None, channel_fit=False),
    "channel": _Mode(None, channel_fit=True),
    "relative": _Mode(_relative_step, channel_fit=True),  # dense-relative BatchNorm, then channel
    "reestimate": _Mode(_reestimate_step, channel_fit=True),  # BatchNorm re-estimated, then channel
}


def check_correction_mode(mode: object) -> str:
    """``mode``, when it names a correction mode."""
    return one_of(mode, "correction mode", tuple(_MODES))


def _batchnorm_step(
    mode: str,
    student: nn.Module,
    teacher: nn.Module,
    channel_inputs: tuple[torch.Tensor, ...] | None,
    bn_batches: Callable[[], Iterable[tuple[torch.Tensor, ...]]] | None,
) -> tuple[_Mode, CorrectionReport]:
    """Run ``mode``'s BatchNorm step on ``student``; its description and the report of what the step did."""
    spec = _MODES[check_correction_mode(mode)]
    report = CorrectionReport()
    counts = spec.batchnorm(student, teacher, channel_inputs, bn_batches) if spec.batchnorm is not None else None
    if counts is not None:
        report.batchnorm_layers, report.batchnorm_samples = counts
    return spec, report


@torch.no_grad()
def apply_correction(
    mode: str,
    student: nn.Module,
    teacher: nn.Module,
    layers: list[PrunableLayer],
    *,
    bn_batches: Iterable[tuple[torch.Tensor, ...]] | None,
    channel_inputs: tuple[torch.Tensor, ...] | None,
    dense: ChannelStats | None = None,
) -> CorrectionReport:
    """One correction mode: ``none``; ``channel`` (per-channel fit of the layers not followed by BatchNorm);
    ``relative`` (dense-relative BatchNorm, then channel); ``reestimate`` (BatchNorm re-estimated on the
    calibration data, then channel). ``dense``: the teacher's channel statistics on ``channel_inputs``
    (:func:`dense_channel_stats`), if already computed."""
    spec, report = _batchnorm_step(mode, student, teacher, channel_inputs,
                                   None if bn_batches is None else lambda: bn_batches)
    if spec.channel_fit and channel_inputs is not None:
        fit_channel_correction(student, teacher, layers, channel_inputs, report, dense=dense)
    return report


@dataclass
class CorrectionChoice:
    """The correction a run kept, and the score of every candidate (higher is better)."""

    mode: str
    scores: dict[str, float]
    report: CorrectionReport
    measured_on: str = "selection"

    def as_dict(self) -> dict:
        return {"chosen": self.mode, "scores": self.scores, "measured_on": self.measured_on,
                **self.report.as_dict()}


def _batchnorm_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every BatchNorm parameter and buffer (what the BatchNorm modes change): small."""
    prefixes = tuple(f"{name}." for name, m in module.named_modules()
                     if isinstance(m, nn.modules.batchnorm._BatchNorm))  # noqa: SLF001
    return copy_state(module, lambda key: key.startswith(prefixes))


@torch.no_grad()
def choose_correction(
    student: nn.Module,
    teacher: nn.Module,
    layers: list[PrunableLayer],
    modes: tuple[str, ...],
    *,
    bn_batches: Callable[[], Iterable[tuple[torch.Tensor, ...]]] | None,
    channel_inputs: tuple[torch.Tensor, ...] | None,
    score: Callable[[], float],
    measured_on: str = "selection",
) -> CorrectionChoice:
    """Score every mode (see :func:`apply_correction`) on ``student`` from the same state, then apply the best.
    Ties keep the earlier mode.

    Memory stays small whatever the model: the BatchNorm modes change BatchNorm tensors alone (copied per
    mode), and the per-channel fit is scored through output hooks and folded into the weights only for the
    mode kept.
    """
    start = _batchnorm_state(student)
    dense = dense_channel_stats(teacher, layers, channel_inputs) \
        if channel_inputs is not None and any(mode != "none" for mode in modes) else None
    trials: dict[str, tuple[dict, ChannelAffine, CorrectionReport]] = {}
    scores: dict[str, float] = {}
    for mode in modes:
        load_state(student, start)
        spec, report = _batchnorm_step(mode, student, teacher, channel_inputs, bn_batches)
        fitted = fit_channel_affine(student, teacher, layers, channel_inputs, dense=dense) \
            if spec.channel_fit and channel_inputs is not None else {}
        with channel_affine_applied(student, layers, fitted):
            scores[mode] = float(score())
        trials[mode] = (_batchnorm_state(student) if spec.batchnorm is not None else start, fitted, report)
    best = max(modes, key=lambda m: (scores[m], -modes.index(m)))
    state, fitted, report = trials[best]
    load_state(student, state)
    if _MODES[best].channel_fit and channel_inputs is not None:
        fold_channel_affine(student, layers, fitted, report, int(channel_inputs[0].shape[0]))
    logger.info("statistics correction: %s (%s)", best, ", ".join(f"{m} {v:.4g}" for m, v in scores.items()))
    return CorrectionChoice(best, scores, report, measured_on)
