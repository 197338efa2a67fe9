"""Agreement of a student with its dense teacher on a fixed list of calibration batches (label-free)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from torch import nn

from onnxsparse.signals import Signals
from onnxsparse.metrics import Agreement


_CACHE_BYTES = 1 << 30  # inputs kept on the device up to this size


def take_samples(batches, n: int) -> list[tuple[torch.Tensor, ...]]:
    """The first ``n`` samples of ``batches`` (the last batch cut to fit); stops reading once it has them."""
    out, seen = [], 0
    if n <= 0:
        return out
    for batch in batches:
        take = min(n - seen, batch[0].shape[0])
        out.append(tuple(t[:take] for t in batch))
        seen += take
        if seen >= n:
            break
    return out


class FixedBatches:
    """A fixed, unaugmented list of batches: kept on the device when small, else re-read each time."""

    def __init__(self, ctx, split: str, n: int, batch_size: int):
        self.ctx, self.split, self.n, self.batch_size = ctx, split, n, batch_size
        arrays = ctx.calib.train if split == "train" else ctx.calib.selection
        nbytes = sum(a[:n].nbytes for a in arrays.values())
        self.cached = take_samples(self._read(), n) if nbytes <= _CACHE_BYTES else None

    def _read(self):
        return self.ctx.calib.batches(self.split, self.batch_size, shuffle=False, seed=0, device=self.ctx.device)

    def __call__(self):
        return self.cached if self.cached is not None else take_samples(self._read(), self.n)


class AgreementScorer:
    """Agreement of the student with teacher outputs cached once, on a fixed list of batches (the selection split's,
    or training samples: the allocation search's fitness)."""

    def __init__(self, teacher: nn.Module, batches: Callable[[], Iterable[tuple[torch.Tensor, ...]]], *,
                 signals: Signals, autocast: Callable[[], contextlib.AbstractContextManager]):
        self.batches = batches
        self.signals = Signals.of(signals)
        self.autocast = autocast
        self.targets: list[list[torch.Tensor]] = []
        # teacher targets in fp32: the student's autocast must not round what it is measured against
        with torch.no_grad():
            for batch in batches():
                self.targets.append([o.detach().float() for o in self.signals.forward(teacher, batch)])

    @torch.no_grad()
    def __call__(self, student: nn.Module) -> Agreement:
        was_training = student.training
        student.eval()
        agreement = Agreement(self.signals)
        try:
            with self.autocast():
                for batch, target in zip(self.batches(), self.targets):
                    agreement.add([o.float() for o in self.signals.forward(student, batch)], target)
        finally:
            student.train(was_training)
        return agreement
