"""Dynamic sparse training with the base-decayed distillation objective (UniPTS section 3).

Every prunable weight keeps its dense value; a :class:`SparseMask` (``dynamic=True``) recomputes the layer's
magnitude mask at its allotted sparsity on every training forward, the backward is straight-through with a
decay ``lambda * (1 - M) * W`` on the pruned part. All trainable parameters (weights, biases, BatchNorm) are
optimised with SGD + momentum, a linear warm-up and a cosine decay over the run; the teacher stays in eval
mode. A NaN/Inf loss rolls back to the last good state (a :class:`.Candidate` captured at the start of the
epoch) with half the learning rate; a third divergence stops the run with :class:`OnnxSparseError`. The batches
come from :mod:`.feed`.

The step loop never waits for the device: losses are summed and their finiteness flagged on the device, read
back every ``FINITE_CHECK_EVERY`` steps and at the end of each epoch (the steps taken after a NaN are undone
by the rollback). Under torchrun the student is wrapped in DistributedDataParallel, every rank reads its own
shard of each batch, and every decision (divergence, the time budget) is taken from values all ranks agree on.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from onnxsparse.distributed import DistContext
from onnxsparse.errors import OnnxSparseError
from onnxsparse.methods.scoring import AgreementScorer
from onnxsparse.methods.unipts.candidate import Candidate, materialise
from onnxsparse.methods.unipts.objective import Distillation

logger = logging.getLogger(__name__)

MAX_ROLLBACKS = 3
FINITE_CHECK_EVERY = 16  # steps between reads of the on-device NaN/Inf flag


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``base`` to 0 at ``total``."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    span = max(total - warmup, 1)
    return 0.5 * base * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))


@dataclass
class TrainPlan:
    iterations: int
    iterations_per_epoch: int
    warmup: int
    lr: float
    momentum: float
    weight_decay: float
    # an optional wall-clock cap (--time-budget): ``iterations`` shrink to fit, measured on the first steps; a run
    # it cut depends on the machine's speed and is not reproducible (TrainResult.cut says so)
    budget_s: float | None = None

    @property
    def epochs(self) -> float:
        return self.iterations / max(self.iterations_per_epoch, 1)


@dataclass
class TrainResult:
    curve: list[dict] = field(default_factory=list)
    iterations: int = 0
    planned_iterations: int = 0
    seconds_per_iteration: float = 0.0
    rollbacks: list[dict] = field(default_factory=list)
    stopped: str | None = None
    cut: bool = False  # the time budget shortened the plan

    def as_dict(self) -> dict:
        return {
            "iterations": self.iterations,
            "planned_iterations": self.planned_iterations,
            "cut_by_time_budget": self.cut,
            "seconds_per_iteration": round(self.seconds_per_iteration, 5),
            "rollbacks": self.rollbacks,
            "stopped": self.stopped,
            "curve": self.curve,
        }


def _batchnorm_eval(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):  # noqa: SLF001
            m.eval()


def _finite_params(module: nn.Module) -> bool:
    flags = [torch.isfinite(p).all() for p in module.parameters() if p.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True  # one host read, not one per parameter


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(
    student: nn.Module,
    teacher: nn.Module,
    epoch_batches: Callable[[int], Iterator[tuple[torch.Tensor, ...]]],
    loss_fn: Distillation,
    plan: TrainPlan,
    *,
    selection: AgreementScorer | None,
    autocast: Callable[[], contextlib.AbstractContextManager],
    progress=None,
    resume: dict | None = None,
    checkpoint: Callable[[dict], None] | None = None,
    checkpoint_every: int = 1,
    freeze_batchnorm: bool = True,
    max_grad_norm: float | None = None,
    dist: DistContext | None = None,
) -> TrainResult:
    """Run the plan. ``student`` must already carry dynamic :class:`SparseMask` parametrizations.

    ``freeze_batchnorm``: BatchNorm layers run in eval mode (the dense running statistics, not the batch's;
    their affine parameters still train), so the statistics never drift toward calibration data unlike the
    data the model was trained on; the finish's correction chooser can still re-estimate them.

    ``max_grad_norm``: the gradient's global norm is clipped to it before each step (None: no clipping).

    ``checkpoint`` receives the state at the end of every ``checkpoint_every``-th epoch; ``resume`` is such a
    state: training continues from it and reaches what the uninterrupted run would have.
    """
    result = TrainResult(planned_iterations=plan.iterations)
    total = plan.iterations
    if total <= 0:
        return result
    dist = dist or DistContext()
    params = [p for p in student.parameters() if p.requires_grad]
    layout = _conv_layout(student)
    try:
        student.to(memory_format=layout)
        teacher.to(memory_format=layout)
        with warnings.catch_warnings():
            # DDP notes that a 1x1 kernel's gradient has the contiguous strides of its channels-last
            # parameter (the same memory layout, other strides for the size-1 axes): harmless
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            return _train(student, teacher, epoch_batches, loss_fn, plan, result, params, layout, selection=selection,
                          autocast=autocast, progress=progress, resume=resume,
                          checkpoint=checkpoint, checkpoint_every=checkpoint_every, dist=dist,
                          freeze_batchnorm=freeze_batchnorm, max_grad_norm=max_grad_norm)
    finally:  # the rest of the pipeline (export, correction) sees plain contiguous tensors again
        student.to(memory_format=torch.contiguous_format)
        teacher.to(memory_format=torch.contiguous_format)


def _conv_layout(module: nn.Module) -> torch.memory_format:
    """channels-last for models with 2-D convolutions: faster convolution kernels on CPU (oneDNN) and CUDA."""
    has_conv = any(isinstance(m, nn.Conv2d) for m in module.modules())
    return torch.channels_last if has_conv else torch.contiguous_format


def _to_layout(batch: tuple[torch.Tensor, ...], layout: torch.memory_format) -> tuple[torch.Tensor, ...]:
    if layout is torch.contiguous_format:
        return batch
    return tuple(t.contiguous(memory_format=layout) if t.dim() == 4 else t for t in batch)


class _Budget:
    """Shortens the run to fit ``budget_s``: the time per step is measured over 8 steps from the 3rd (the first
    ones pay for warm-up), then the total is fixed once; rank 0's measure decides for every rank."""

    def __init__(self, budget_s: float | None, start: float, device: torch.device, dist: DistContext):
        self.budget_s, self.start, self.device, self.dist = budget_s, start, device, dist
        self.timed_from: tuple[int, float] | None = None

    def total_after(self, step: int, total: int) -> int:
        if self.budget_s is None:
            return total
        if step == 2:
            _synchronize(self.device)
            self.timed_from = (step, time.perf_counter())
        elif self.timed_from is not None and step == self.timed_from[0] + 8:
            _synchronize(self.device)
            per = (time.perf_counter() - self.timed_from[1]) / 8
            remaining = self.budget_s - (time.perf_counter() - self.start)
            # an epoch-end selection pass is about 1/3 of an iteration per batch: keep 10% for it
            fit = int(self.dist.broadcast_float(step + max(int(0.9 * remaining / max(per, 1e-9)), 0)))
            if fit < total:
                logger.warning("training shortened to %d of %d iterations by --time-budget: this run depends on the "
                               "machine's speed and is not reproducible", max(fit, step), total)
                return max(fit, step)
        return total


@dataclass
class _Epoch:
    """What one epoch's steps leave behind; the loss sum and NaN flags stay on the device until read."""

    loss_sum: torch.Tensor
    nonfinite: torch.Tensor
    first_bad: torch.Tensor  # step of the first NaN/Inf loss, -1 if none
    n_losses: int = 0
    diverged: bool = False


def _run_epoch(model, student, teacher, batches, loss_fn, optimizer, params, layout, epoch: int, step: int,
               total: int, plan: TrainPlan, base_lr: float, *, autocast, progress, budget: _Budget, dist,
               max_grad_norm: float | None, device) -> tuple[_Epoch, int, int]:
    """The steps of one epoch: (what they left, the step reached, the total, possibly shortened by the budget)."""
    state = _Epoch(torch.zeros((), dtype=torch.float64, device=device), torch.zeros((), dtype=torch.bool, device=device),
                   torch.full((), -1, dtype=torch.int64, device=device))
    for batch in batches:
        if step >= total:
            break
        if batch[0].shape[0] < 2:  # BatchNorm cannot train on one sample (same on every rank: equal shards)
            continue
        batch = _to_layout(batch, layout)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, plan.warmup, base_lr)
        with autocast():
            loss = loss_fn.forward(model, student, teacher, batch, epoch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        detached = loss.detach()
        bad = ~torch.isfinite(detached)
        state.first_bad = torch.where(bad & ~state.nonfinite, step, state.first_bad)
        state.nonfinite |= bad
        state.loss_sum += detached.double()
        state.n_losses += 1
        step += 1
        if progress is not None:
            progress.update(1)
        if state.n_losses % FINITE_CHECK_EVERY == 0 and dist.any(state.nonfinite):
            state.diverged = True
            break
        new_total = budget.total_after(step, total)
        if new_total != total:
            total = new_total
            if progress is not None:
                progress.total = total
                progress.refresh()
    return state, step, total


def _train(student, teacher, epoch_batches, loss_fn, plan, result, params, layout, *, selection, autocast, progress,
           resume, checkpoint, checkpoint_every, dist, freeze_batchnorm, max_grad_norm) -> TrainResult:
    total = plan.iterations
    optimizer = torch.optim.SGD(params, lr=plan.lr, momentum=plan.momentum, weight_decay=plan.weight_decay)
    base_lr = plan.lr
    teacher.eval()
    step = 0
    start = time.perf_counter()
    if resume is not None:
        materialise(Candidate("checkpoint", resume["student"]), student)
        optimizer.load_state_dict(resume["optimizer"])
        step, base_lr, total = int(resume["step"]), float(resume["base_lr"]), int(resume["total"])
        result.cut = total < plan.iterations
        result.curve, result.rollbacks = list(resume["curve"]), list(resume["rollbacks"])
        result.planned_iterations = total
        if progress is not None:
            progress.total = total
            progress.update(step)
    # DDP's constructor makes every rank start from rank 0's parameters and buffers
    model = dist.wrap(student)
    device = params[0].device if params else torch.device("cpu")
    budget = _Budget(plan.budget_s, start, device, dist)
    # the rollback point: the student and optimizer at the start of the last epoch that stayed finite
    good, good_optim, good_step = Candidate.capture(student, "rollback"), copy.deepcopy(optimizer.state_dict()), step
    while step < total:
        epoch = step // max(plan.iterations_per_epoch, 1)
        student.train()
        if freeze_batchnorm:
            _batchnorm_eval(student)
        ran, step, total = _run_epoch(model, student, teacher, epoch_batches(epoch), loss_fn, optimizer, params,
                                      layout, epoch, step, total, plan, base_lr, autocast=autocast,
                                      progress=progress, budget=budget, dist=dist, max_grad_norm=max_grad_norm,
                                      device=device)
        result.cut = result.cut or total < plan.iterations
        if not ran.diverged and ran.n_losses and dist.any(ran.nonfinite):
            ran.diverged = True
        if not ran.diverged and not ran.n_losses:
            result.stopped = "no training batches (fewer than 2 calibration samples)"
            break
        if not ran.diverged and not dist.all(_finite_params(student)):
            ran.diverged = True
        if ran.diverged:
            _record_divergence(result, optimizer, ran, epoch, step, dist)
            logger.warning("NaN/Inf loss at step %d: rolling back to step %d and halving the lr", step, good_step)
            materialise(good, student)
            optimizer.load_state_dict(good_optim)
            base_lr *= 0.5
            if progress is not None:
                progress.update(good_step - step)
            step = good_step
            continue
        result.curve.append(_epoch_row(ran, epoch, step, optimizer, loss_fn, start, selection, student, dist))
        if progress is not None:
            loss = result.curve[-1]["loss"]
            progress.set_postfix(loss=f"{loss:.4g}" if loss is not None else "-")
        good, good_optim = Candidate.capture(student, "rollback"), copy.deepcopy(optimizer.state_dict())
        good_step = step
        if checkpoint is not None and step < total and len(result.curve) % max(checkpoint_every, 1) == 0:
            checkpoint({"student": good.state, "optimizer": good_optim, "step": step, "base_lr": base_lr,
                        "total": total, "curve": result.curve, "rollbacks": result.rollbacks})
    result.iterations = step
    result.seconds_per_iteration = (time.perf_counter() - start) / max(step, 1)
    return result


def _record_divergence(result: TrainResult, optimizer, ran: _Epoch, epoch: int, step: int, dist) -> None:
    """Note a NaN/Inf epoch in the result; the third one ends the run with a user error."""
    lr_now = optimizer.param_groups[0]["lr"]
    bad_step = int(dist.broadcast_float(float(ran.first_bad)))
    result.rollbacks.append({"epoch": epoch, "step": bad_step if bad_step >= 0 else step, "lr": lr_now})
    if len(result.rollbacks) >= MAX_ROLLBACKS:
        raise OnnxSparseError(
            f"UniPTS training diverged (NaN/Inf loss) {len(result.rollbacks)} times, last at step {step} "
            f"with lr {lr_now:.3g}; nothing was written. Try a smaller --lr."
        )


def _epoch_row(ran: _Epoch, epoch: int, step: int, optimizer, loss_fn, start: float, selection, student, dist) -> dict:
    """The training curve's row for a finished epoch (the selection agreement when there is a selection)."""
    row = {
        "epoch": epoch,
        "step": step,
        "loss": dist.mean_float(float(ran.loss_sum) / ran.n_losses) if ran.n_losses else None,
        "lr": optimizer.param_groups[0]["lr"],
        "tau": loss_fn.tau(epoch),
        "seconds": round(time.perf_counter() - start, 3),
    }
    if selection is not None:
        agreement = selection(student)
        row.update({f"selection_{k}": v for k, v in agreement.as_dict().items() if k != "samples"})
    return row
