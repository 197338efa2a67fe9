"""Distillation of a channel-pruned student from the dense teacher (``--pattern channel --method unipts``).

The student starts from the selected, refitted masked model. Every consumer column of a removed channel is held
at zero (weights masked after each step, their gradients masked before it), so the student keeps computing what
the shrunk model computes; every other tensor the importer tracks trains (BatchNorm statistics frozen, as in the
quick recipe). The loss is UniPTS's per-output distillation. The trained student is kept only when it is closer to
the dense model than its start on the selection split by the same paired rule UniPTS uses.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from onnxsparse.methods.unipts import KEEP_TRAINED_MARGIN, KEEP_TRAINED_Z
from onnxsparse.methods.unipts.objective import Distillation, default_gamma
from onnxsparse.metrics import paired_improvement
from onnxsparse.state import copy_state, load_state
from onnxsparse.structured.select import _consumer_removed_columns

logger = logging.getLogger(__name__)

_LR = 0.01  # a refitted start is close to the teacher already: the quick recipe's 0.05 moved it away on the sample


def column_masks(selection, tracked, student: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, kept mask) of every consumer weight with removed columns, in the student's layout."""
    by_name = {t.source.name: t for t in tracked if not t.shared}
    shapes: dict[str, tuple] = {}
    masks: dict[str, np.ndarray] = {}
    for (_, name, axis), idx in _consumer_removed_columns(selection.analysis, selection.plan.removed).items():
        if not idx:
            continue
        t = by_name[name]
        if name not in masks:
            shapes[name] = tuple(t.original.shape)
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


def distill(ctx, selection, *, budget: float | None) -> dict:
    """Train ``ctx.student`` in place toward ``ctx.teacher`` with the removed channels held out; a report."""
    cfg = ctx.config.unipts
    student, teacher = ctx.student, ctx.teacher
    masks = column_masks(selection, ctx.imported.tracked, student)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params or ctx.calib.n_train < 2:
        return {"skipped": "nothing to train"}
    scorer = ctx.selection_scorer()
    start_state = copy_state(student)
    start = scorer(student)
    epochs = cfg.epochs if cfg.epochs is not None else 20.0
    loss_fn = Distillation(ctx.output_signals(), tau0=cfg.tau0, gamma=cfg.gamma or default_gamma(epochs),
                           temperature=cfg.temperature)
    lr = cfg.lr if cfg.lr is not None else _LR
    opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=0.0)
    started = time.perf_counter()
    student.eval()  # frozen BatchNorm statistics; affine parameters train
    done, steps, planned = 0, 0, int(math.ceil(epochs))
    losses = []
    for epoch in range(planned):
        total, count = 0.0, 0
        for batch in ctx.train_batches(min(ctx.config.batch_size, ctx.calib.n_train), shuffle=True,
                                       seed=ctx.config.seed + epoch):
            for group in opt.param_groups:  # cosine over the planned epochs
                group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * min(1.0, (epoch + count / 1e9) / planned)))
            loss = loss_fn.forward(student, student, teacher, batch, float(epoch))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                for p, m in masks:
                    if p.grad is not None:
                        p.grad.mul_(m)
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            with torch.no_grad():
                for p, m in masks:
                    p.mul_(m)
            total, count, steps = total + loss.item(), count + 1, steps + 1
        losses.append(round(total / max(count, 1), 6))
        done += 1
        elapsed = time.perf_counter() - started
        if budget is not None and elapsed * (done + 1) / done > budget:
            planned = done  # the next epoch would not fit
            break
    trained = scorer(student)
    paired = paired_improvement(trained, start)
    kept = paired.better(KEEP_TRAINED_Z, KEEP_TRAINED_MARGIN) and math.isfinite(trained.score)
    if not kept:
        load_state(student, start_state)
    student.eval()
    return {"epochs": done, "steps": steps, "lr": lr, "loss": losses, "seconds": round(time.perf_counter() - started, 2),
            "start": start.as_dict(), "trained": trained.as_dict(), "kept": "trained" if kept else "start",
            "comparison": paired.as_dict()}
