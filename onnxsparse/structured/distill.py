"""Distillation of a channel-pruned student from the dense teacher (``--pattern channel --method unipts``).

The student starts from the selected, refitted masked model. Every consumer column of a removed channel is held
at zero (weights masked after each step, their gradients masked before it), so the student keeps computing what
the shrunk model computes; every other tensor the importer tracks trains (BatchNorm statistics frozen, as in the
quick recipe). The loss is UniPTS's per-output distillation.

With :class:`Regrowth`, the masks move during training in the spirit of dynamic sparse training: at a few points,
per dependency group, the kept channels whose removal the squared first-order Taylor estimate says costs the loss
least are removed and as many removed channels whose masked consumer columns received the most gradient since the
last point are regrown (their columns start at zero and train; they are not dropped again at the next point).
Every group keeps its channel count, so the MACs target holds; a removed channel's producer filter and
per-channel parameters received no gradient while it was out (its consumer columns were zero), so it regrows as
the dense model computed it. With ``Regrowth.refit`` the consumers of a group that swapped are then refitted by
least squares to the dense layer on the selection's statistics, as the start was: a dropped channel's share
moves to the kept ones at once instead of being relearned by gradient steps.

The trained student is kept only when it is closer to the dense model than its start on the selection split by
the same paired rule UniPTS uses; the selection's plan then carries the final removed channels (the start's
otherwise), which is what the exporter removes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from onnxsparse.device import determinism
from onnxsparse.methods.unipts import KEEP_TRAINED_MARGIN, KEEP_TRAINED_Z, Candidate, materialise
from onnxsparse.methods.unipts.objective import Distillation, default_gamma
from onnxsparse.metrics import paired_improvement
from onnxsparse.structured import select
from onnxsparse.structured.select import _consumer_removed_columns
from onnxsparse.validate import boolean, int_at_least, number_in

logger = logging.getLogger(__name__)

_LR = 0.01  # a refitted start is close to the teacher already: the quick recipe's 0.05 moved it away on the sample


@dataclass(frozen=True)
class Regrowth:
    """Channel swaps during distillation (RigL's schedule on whole channels).

    ``updates`` swap points evenly spaced over the first ``until`` of the planned steps; at the k-th
    (k = 0..updates-1) each group swaps ``round(fraction * (1 + cos(pi k / updates)) / 2 * min(removed, kept))``
    channels.
    """

    fraction: float = 0.3
    updates: int = 4
    until: float = 0.75
    # the consumers of a group that swapped are refitted by least squares to the dense layer (their training so
    # far is lost); off: only the dropped columns zeroed and the regrown ones started at zero
    refit: bool = True

    def __post_init__(self) -> None:
        number_in(self.fraction, "channel regrowth fraction", 0, 1, lo_open=True)
        int_at_least(self.updates, "channel regrowth updates")
        number_in(self.until, "channel regrowth until", 0, 1, lo_open=True)
        boolean(self.refit, "channel regrowth refit")

    def fraction_at(self, k: int) -> float:
        return self.fraction * 0.5 * (1.0 + math.cos(math.pi * k / self.updates))

    def steps(self, total: int) -> list[int]:
        """The steps (1-based counts of steps taken) after which the swaps happen, for ``total`` planned steps."""
        span = self.until * total
        return sorted({max(1, int(round(span * (k + 1) / (self.updates + 1)))) for k in range(self.updates)})


# What ``prune --pattern channel --method unipts`` uses; docs/channels.md gives the measurement behind it.
DEFAULT_REGROWTH: Regrowth | None = None


def column_masks(selection, tracked, student: torch.nn.Module,
                 removed: dict[int, list[int]] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, kept mask) of every consumer weight with removed columns, in the student's layout
    (``removed``: these channels instead of the plan's)."""
    removed = selection.plan.removed if removed is None else removed
    by_name = {t.source.name: t for t in tracked if not t.shared}
    masks: dict[str, np.ndarray] = {}
    for (_, name, axis), idx in _consumer_removed_columns(selection.analysis, removed).items():
        if not idx:
            continue
        t = by_name[name]
        if name not in masks:
            masks[name] = np.ones(t.layout.to_onnx(torch.zeros(t.original.shape)).shape)
        index = [slice(None)] * masks[name].ndim
        index[axis] = sorted(idx)
        masks[name][tuple(index)] = 0.0
    out = []
    for name, mask in masks.items():
        t = by_name[name]
        param = t.get(student)
        out.append((param, (t.layout.to_torch(mask) != 0).reshape(param.shape).to(param.device)))
    return out


class _Regrower:
    """Per-channel statistics of every group's consumer columns between swap points, and the swaps themselves.

    Removed channels are ranked by the gradient energy their masked columns received; kept channels by the
    first-order estimate of what removing them costs the loss, ``(sum over their columns of grad * weight) ** 2``
    averaged over the steps (the Taylor criterion of Molchanov et al.). Both are per-step sums over each channel's
    entries, gathered with an index map in the student's layout, each consumer's share summed over consumers.
    """

    def __init__(self, selection, tracked, student: torch.nn.Module) -> None:
        self.student = student
        self.by_name = {t.source.name: t for t in tracked if not t.shared}
        self.removed = {i: sorted(c) for i, c in selection.plan.removed.items()}
        self.groups = [g for g in selection.analysis.prunable() if self.removed.get(g.index)]
        self.maps: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # group -> (param, channel of entry)
        self.grown = {g.index: torch.zeros(g.channels, dtype=torch.float64) for g in self.groups}
        self.taylor = {g.index: torch.zeros(g.channels, dtype=torch.float64) for g in self.groups}
        self.fresh: dict[int, set[int]] = {}  # channels regrown at the last swap: not dropped at the next one
        for g in self.groups:
            for p in g.params:
                if p.role == "consumer":
                    t = self.by_name[p.name]
                    param = t.get(student)
                    self.maps.setdefault(g.index, []).append((param, self._channel_map(g, p, t, param)))
        self.history: list[dict] = []

    @staticmethod
    def _channel_map(g, p, t, param: torch.Tensor) -> torch.Tensor:
        """Channel of ``g`` that every entry of the student's ``param`` belongs to (``g.channels``: none)."""
        shape = t.layout.to_onnx(torch.zeros(t.original.shape)).shape
        channel = np.full(shape[p.axis], g.channels, np.int64)
        channel[g.indices(p, range(g.channels))] = np.repeat(np.arange(g.channels), p.repeat)
        onnx_map = np.moveaxis(np.broadcast_to(channel, shape[:p.axis] + shape[p.axis + 1:] + (shape[p.axis],)),
                               -1, p.axis)
        # positions travel through the layout exactly (a permutation, times the layout's scale)
        position = t.layout.to_torch(np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape))
        position = torch.round(position / t.layout.scale).to(torch.int64).reshape(-1)
        return torch.from_numpy(np.ascontiguousarray(onnx_map).reshape(-1))[position].reshape(param.shape) \
            .to(param.device)

    def accumulate(self) -> None:
        """Add this step's per-channel statistics (call before the masks zero the gradients)."""
        with torch.no_grad():
            for g in self.groups:
                grown = torch.zeros(g.channels + 1, dtype=torch.float64)
                taylor = torch.zeros(g.channels + 1, dtype=torch.float64)
                for param, channel in self.maps[g.index]:
                    if param.grad is None:
                        continue
                    grad = param.grad.detach()
                    index = channel.reshape(-1)
                    g2 = torch.zeros(g.channels + 1, dtype=torch.float64, device=grad.device).index_add_(
                        0, index, grad.reshape(-1).double().square())
                    gw = torch.zeros(g.channels + 1, dtype=torch.float64, device=grad.device).index_add_(
                        0, index, (grad * param.detach()).reshape(-1).double()).square()
                    grown += (g2 / g2[:-1].sum().clamp_min(1e-30)).cpu()
                    taylor += (gw / gw[:-1].sum().clamp_min(1e-30)).cpu()
                self.grown[g.index] += grown[:-1]
                self.taylor[g.index] += taylor[:-1]

    def refit(self, selection, changed: set[int]) -> list[torch.Tensor]:
        """Least-squares refit (from the dense weights, as the selection did) of every consumer that reads a group
        in ``changed``, with the current removed channels; the parameters written."""
        if selection.stats is None or selection.model is None or not changed:
            return []
        nodes = {p.node for i in changed for p in selection.analysis.groups[i].params if p.role == "consumer"}
        groups = {g.index for g in self.groups if any(p.node in nodes for p in g.params if p.role == "consumer")}
        plan = select.plan(selection.model, selection.analysis, {i: self.removed[i] for i in sorted(groups)},
                           stats=selection.stats, writable=selection.writable)
        written = []
        with torch.no_grad():
            for name, array in plan.updates.items():
                t = self.by_name[name]
                param = t.get(self.student)
                param.copy_(t.layout.to_torch(array).to(param.dtype).reshape(param.shape))
                written.append(param)
        return written

    def _onnx(self, name: str, value: torch.Tensor) -> np.ndarray:
        t = self.by_name[name]
        return np.asarray(t.layout.to_onnx(value.detach().reshape(t.original.shape)), dtype=np.float64)

    def swap(self, k: int, schedule: Regrowth, step: int) -> bool:
        """The k-th swap; True when some channel moved (the caller then rebuilds the masks)."""
        fraction = schedule.fraction_at(k)
        moved = 0
        self.changed: set[int] = set()
        fresh: dict[int, set[int]] = {}
        for g in self.groups:
            removed = self.removed[g.index]
            kept = sorted(set(range(g.channels)) - set(removed) - self.fresh.get(g.index, set()))
            n = min(int(round(fraction * min(len(removed), len(kept)))), len(kept))
            if n <= 0:
                continue
            grown, cost = self.grown[g.index].numpy(), self.taylor[g.index].numpy()
            rem = np.asarray(removed)
            grow = rem[np.argsort(-grown[rem], kind="stable")[:n]]
            grow = grow[grown[grow] > 0]  # a column that received no gradient has nothing to offer
            if not len(grow):
                continue
            kp = np.asarray(kept)
            drop = kp[np.argsort(cost[kp], kind="stable")[:len(grow)]]
            self.removed[g.index] = sorted((set(removed) - set(grow.tolist())) | set(drop.tolist()))
            fresh[g.index] = set(grow.tolist())
            self.changed.add(g.index)
            moved += len(grow)
        self.fresh = fresh
        self.history.append({"step": step, "fraction": round(fraction, 4), "swapped": moved})
        for acc in (*self.grown.values(), *self.taylor.values()):
            acc.zero_()
        return moved > 0


def distill(ctx, selection, *, budget: float | None, regrowth: Regrowth | None = DEFAULT_REGROWTH) -> dict:
    """Train ``ctx.student`` in place toward ``ctx.teacher`` with the removed channels held out (moving between
    swap points with ``regrowth``); a report. ``selection.plan`` ends with the removed channels of the student
    that was kept."""
    try:
        with determinism(ctx.config.deterministic, ctx.device):
            return _distill(ctx, selection, budget, regrowth)
    finally:
        selection.model, selection.stats = None, None  # the Gram matrices are not needed past training


def _distill(ctx, selection, budget: float | None, regrowth: Regrowth | None) -> dict:
    cfg = ctx.config.unipts
    student, teacher = ctx.student, ctx.teacher
    masks = column_masks(selection, ctx.imported.tracked, student)
    if regrowth is None or not regrowth.refit:
        selection.model, selection.stats = None, None
    params = [p for p in student.parameters() if p.requires_grad]
    if not params or ctx.calib.n_train < 2:
        return {"skipped": "nothing to train"}
    scorer = ctx.selection_scorer()
    start_state = Candidate.capture(student, "start")
    start = scorer(student)
    epochs = cfg.epochs if cfg.epochs is not None else 20.0
    loss_fn = Distillation(ctx.output_signals(), tau0=cfg.tau0, gamma=cfg.gamma or default_gamma(epochs),
                           temperature=cfg.temperature)
    lr = cfg.lr if cfg.lr is not None else _LR
    opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=0.0)
    batch_size = min(ctx.config.batch_size, ctx.calib.n_train)
    planned = int(math.ceil(epochs))
    regrower = _Regrower(selection, ctx.imported.tracked, student) if regrowth is not None and masks else None
    swap_at = regrowth.steps(planned * math.ceil(ctx.calib.n_train / batch_size)) if regrower is not None else []
    started = time.perf_counter()
    student.eval()  # frozen BatchNorm statistics; affine parameters train
    done, steps = 0, 0
    losses = []
    for epoch in range(planned):
        total, count = 0.0, 0
        for batch in ctx.train_batches(batch_size, shuffle=True, seed=ctx.config.seed + epoch):
            for group in opt.param_groups:  # cosine over the planned epochs
                group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * min(1.0, (epoch + count / 1e9) / planned)))
            loss = loss_fn.forward(student, student, teacher, batch, float(epoch))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if regrower is not None:
                regrower.accumulate()
            with torch.no_grad():
                for p, m in masks:
                    if p.grad is not None:
                        p.grad.mul_(m)
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            total, count, steps = total + loss.item(), count + 1, steps + 1
            if regrower is not None and steps in swap_at:
                if regrower.swap(swap_at.index(steps), regrowth, steps):
                    masks = column_masks(selection, ctx.imported.tracked, student, regrower.removed)
                    refitted = regrower.refit(selection, regrower.changed) if regrowth.refit else []
                    regrower.history[-1]["refitted_tensors"] = len(refitted)
                    with torch.no_grad():  # neither a dropped column's nor a refitted tensor's old momentum
                        for p, m in [*masks, *((p, torch.zeros((), device=p.device)) for p in refitted)]:
                            buf = opt.state.get(p, {}).get("momentum_buffer")
                            if buf is not None:
                                buf.mul_(m)
            with torch.no_grad():
                for p, m in masks:
                    p.mul_(m)
        losses.append(round(total / max(count, 1), 6))
        done += 1
        elapsed = time.perf_counter() - started
        if budget is not None and elapsed * (done + 1) / done > budget:
            planned = done  # the next epoch would not fit
            break
    trained = scorer(student)
    paired = paired_improvement(trained, start)
    kept = paired.better(KEEP_TRAINED_Z, KEEP_TRAINED_MARGIN) and math.isfinite(trained.score)
    report = {"epochs": done, "steps": steps, "lr": lr, "loss": losses,
              "seconds": round(time.perf_counter() - started, 2), "start": start.as_dict(),
              "trained": trained.as_dict(), "kept": "trained" if kept else "start", "comparison": paired.as_dict()}
    if regrower is not None:
        start_removed = selection.plan.removed
        changed = {i: len(set(c) - set(start_removed[i])) for i, c in regrower.removed.items()}
        report["regrowth"] = {**dataclasses.asdict(regrowth), "swaps": regrower.history,
                              "channels_moved": sum(changed.values()),
                              "groups_changed": sum(1 for v in changed.values() if v)}
        if kept:
            _final_plan(selection, regrower, student)
    if not kept:
        materialise(start_state, student)
    student.eval()
    return report


def _final_plan(selection, regrower: _Regrower, student: torch.nn.Module) -> None:
    """The plan of the trained student: its removed channels and its (masked) consumer tensors."""
    plan = selection.plan
    removed = {i: list(regrower.removed.get(i, c)) for i, c in plan.removed.items()}
    updates = {name: regrower._onnx(name, regrower.by_name[name].get(student)) for name in plan.updates}
    selection.plan = dataclasses.replace(plan, removed=removed, updates=updates)
