"""Whether UniPTS's augmentation may mirror its inputs: only where the dense model's outputs survive a flip."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from onnxsparse import metrics
from onnxsparse.methods.base import PruneContext
from onnxsparse.methods.scoring import FixedBatches
from onnxsparse.signals import Signals

# the flip is used when the teacher's outputs survive it on at least this share of the samples (the agreement of
# onnxsparse.metrics, per output); orientation classifiers fail it (a mirror turns 90 into 270)
FLIP_AGREEMENT = 0.9
FLIP_SAMPLES = 256


def decide_flip(ctx: PruneContext, signals: Signals) -> tuple[bool, float]:
    """(whether the augmentation flips, the teacher's agreement with itself on mirrored training samples); rank
    0's decision holds for every rank."""
    batches = FixedBatches(ctx, "train", min(FLIP_SAMPLES, ctx.calib.n_train), ctx.config.batch_size)()
    measured = flip_agreement(ctx.teacher, signals, batches, ctx.calib.layouts[ctx.calib.input_names[0]])
    return bool(ctx.dist.broadcast_object(measured >= FLIP_AGREEMENT)), measured


@torch.no_grad()
def flip_agreement(teacher: nn.Module, signals, batches: Iterable[tuple[torch.Tensor, ...]], layout: str) -> float:
    """How well the teacher's outputs survive a horizontal flip of its (single, image) input: per output, the
    agreement of the output on the flipped input with the output on the original, taken as is or with its last
    position axis mirrored (a sequence read along the width, a map), whichever is higher; the lowest over the
    outputs. ``layout`` is the input's ("nchw" or "nhwc")."""
    width_axis = 3 if layout == "nchw" else 2
    totals: dict[int, list[float]] = {}  # per output: summed agreement as is [, mirrored]
    n = 0
    teacher.eval()
    for batch in batches:
        original = signals.forward(teacher, batch)
        flipped = signals.forward(teacher, (batch[0].flip(width_axis), *batch[1:]))
        for i, (a, b) in enumerate(zip(original, flipped)):
            a, b = a.float(), b.float()
            kind, axis = signals.kind(i), signals.axis(i) % max(a.dim(), 1)
            positions = [d for d in range(1, a.dim()) if kind not in ("class", "sequence") or d != axis]
            targets = (a, a.flip(positions[-1])) if positions else (a,)
            sums = totals.setdefault(i, [0.0] * len(targets))
            for k, target in enumerate(targets):
                value, _ = metrics.agreement(target, b, kind, axis)
                sums[k] += (0.0 if value is None else value) * a.shape[0]
        n += batch[0].shape[0]
    return min(max(sums) / n for sums in totals.values()) if totals else 1.0
