"""One definition of agreement and distance per output kind, for every consumer: the search's fitness, the
start and keep decisions, the statistics-correction chooser, the flip check, the quality gate, ``compare`` and
``eval``.

Output kinds (:mod:`onnxsparse.signals` says which output is which):

* ``class`` / ``sequence``: agreement = share of positions whose arg-max over the class axis matches the dense
  model's (top-1 agreement; per position for sequences); distance = mean KL over the class axis.
* ``binary`` (behind a Sigmoid): agreement = Jaccard index of the positive decisions (logit > 0, probability
  > 0.5), 1 where neither model decides positive; distance = mean Bernoulli KL per element.
* ``dense``: agreement = R^2 of the output against the dense one, floored at 0; distance = 1 - R^2 (the
  normalised MSE).

A model's agreement is the lowest of its outputs' agreements: the figure ``--min-agreement`` is compared with,
by ``prune`` and ``compare`` alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from onnxsparse.signals import KINDS, Signals
from onnxsparse.validate import one_of

_EPS = 1e-8
MEASURES = {
    "class": "top-1 agreement",
    "sequence": "per-position top-1 agreement",
    "binary": "Jaccard index of the positive decisions",
    "dense": "R^2 (1 - SSE/SST)",
}
# Where the binary decision falls: on logits (what the methods compare) and on probabilities (ONNX outputs).
LOGIT_THRESHOLD = 0.0
PROBABILITY_THRESHOLD = 0.5


def _classes_last(z: torch.Tensor, axis: int) -> torch.Tensor:
    """``z`` with its class axis last, flattened to ``(positions, C)``."""
    return z.movedim(axis, -1).reshape(-1, z.shape[axis])


def _tensor(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x


class AgreementCount:
    """Streaming agreement of one output with the dense model's, by the output's kind (module docstring).

    ``axis``: the class axis (class / sequence); ``threshold``: the binary decision's
    (:data:`LOGIT_THRESHOLD` or :data:`PROBABILITY_THRESHOLD`). Class outputs whose class axis holds a single
    value are measured as dense."""

    def __init__(self, kind: str, axis: int = -1, threshold: float = LOGIT_THRESHOLD):
        one_of(kind, "output kind", KINDS)
        self.kind, self.axis, self.threshold = kind, axis, threshold
        self.hits = self.total = 0  # class / sequence: matching positions; binary: intersection, union
        self.sse = self.st = self.s1 = 0.0
        self.count = 0
        self.measured_as = kind

    def add(self, dense, other) -> None:
        a, b = _tensor(dense), _tensor(other)
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(f"outputs differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
        if a.numel() == 0:
            return
        kind = self.kind
        if kind in ("class", "sequence"):
            axis = (1 if kind == "class" else self.axis) if a.dim() >= 2 else None
            if axis is not None and -a.dim() <= axis < a.dim() and a.shape[axis] > 1 and a.is_floating_point():
                self.hits += int((a.argmax(axis) == b.argmax(axis)).sum())
                self.total += a.numel() // a.shape[axis]
                return
            kind = self.measured_as = "dense"
        if kind == "binary":
            pa, pb = a > self.threshold, b > self.threshold
            self.hits += int((pa & pb).sum())
            self.total += int((pa | pb).sum())
            self.count += a.numel()
            return
        a64, b64 = a.double(), b.double()
        self.sse += float(((a64 - b64) ** 2).sum())
        self.st += float((a64 ** 2).sum())
        self.s1 += float(a64.sum())
        self.count += a64.numel()

    @property
    def value(self) -> float | None:
        if self.measured_as in ("class", "sequence"):
            return self.hits / self.total if self.total else None
        if self.measured_as == "binary":
            return (self.hits / self.total if self.total else 1.0) if self.count else None
        if not self.count:
            return None
        sst = self.st - self.s1 * self.s1 / self.count
        if sst <= 0:
            return 1.0 if self.sse == 0 else 0.0
        return max(1.0 - self.sse / sst, 0.0)

    @property
    def measure(self) -> str:
        return MEASURES[self.measured_as]


def agreement(dense, other, kind: str, axis: int = -1, threshold: float = LOGIT_THRESHOLD) -> tuple[float | None, str]:
    """(agreement, its name) of ``other`` with ``dense`` (whole arrays or tensors, batch first)."""
    count = AgreementCount(kind, axis, threshold)
    count.add(dense, other)
    return count.value, count.measure


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion ``p`` measured on ``n`` samples (None for n = 0)."""
    if n <= 0:
        return None
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(centre - half, 0.0), min(centre + half, 1.0)


class _Term:
    """Running sums for one compared tensor."""

    def __init__(self, kind: str, axis: int):
        self.kind, self.axis = kind, axis
        self.divergence = 0.0  # summed KL (class / sequence / binary)
        self.positions = 0  # distributions (class, sequence) or elements (binary) seen
        self.agreement = AgreementCount(kind, axis if kind == "sequence" else 1)
        self.sse = self.st = self.s1 = 0.0
        self.count = 0
        # per sample: its mean KL over positions (class / sequence / binary), its squared error (dense)
        self.samples: list[torch.Tensor] = []

    def add(self, s: torch.Tensor, t: torch.Tensor) -> None:
        s, t = s.float(), t.float()
        n = max(t.shape[0], 1) if t.dim() else 1
        if self.kind in ("class", "sequence"):
            s2, t2 = _classes_last(s, self.axis if self.kind == "sequence" else 1), \
                _classes_last(t, self.axis if self.kind == "sequence" else 1)
            log_s, log_t = F.log_softmax(s2, 1), F.log_softmax(t2, 1)
            rows = (log_t.exp() * (log_t - log_s)).sum(1)  # batch-major: the batch axis is never the class axis
            self.divergence += float(rows.sum())
            self.samples.append(rows.double().reshape(n, -1).mean(1).cpu())
            self.agreement.add(t2, s2)
            self.positions += s2.shape[0]
            return
        if self.kind == "binary":
            q = torch.sigmoid(t)
            elements = (F.binary_cross_entropy_with_logits(s, q, reduction="none")
                        - F.binary_cross_entropy_with_logits(t, q, reduction="none"))
            self.divergence += float(elements.sum())
            self.samples.append(elements.double().reshape(n, -1).mean(1).cpu())
            self.agreement.add(t, s)
            self.positions += t.numel()
            return
        s, t = s.double(), t.double()
        errors = (s - t) ** 2
        self.sse += float(errors.sum())
        self.samples.append(errors.reshape(n, -1).sum(1).cpu())
        self.st += float((t ** 2).sum())
        self.s1 += float(t.sum())
        self.count += t.numel()

    def per_sample(self) -> torch.Tensor:
        """Each sample's share of :attr:`distance`: their mean is the distance."""
        values = torch.cat(self.samples) if self.samples else torch.zeros(0, dtype=torch.float64)
        if self.kind != "dense":
            return values
        var = self.st - self.s1 * self.s1 / max(self.count, 1)
        return values * values.numel() / max(var, _EPS)

    @property
    def kl(self) -> float | None:
        return self.divergence / self.positions if self.kind != "dense" and self.positions else None

    @property
    def top1(self) -> float | None:
        """The output's agreement (:class:`AgreementCount`) for class, sequence and binary outputs."""
        return self.agreement.value if self.kind != "dense" and self.positions else None

    @property
    def nmse(self) -> float | None:
        if self.kind != "dense" or not self.count:
            return None
        var = self.st - self.s1 * self.s1 / max(self.count, 1)
        return self.sse / max(var, _EPS)

    @property
    def distance(self) -> float:
        value = self.nmse if self.kind == "dense" else self.kl
        return float("inf") if value is None else value


class Agreement:
    """Label-free closeness of student outputs to cached teacher outputs, accumulated over batches.

    Per compared tensor: mean KL and top-1 agreement for class and sequence logits (per position), mean
    Bernoulli KL and the Jaccard index of the positive decisions for binary logits, the normalised MSE
    (1 - R^2) for dense outputs.
    ``score`` is higher-is-better: minus the mean of the per-output distances.
    """

    def __init__(self, signals: Signals):
        self.signals = Signals.of(signals)
        self.terms: list[_Term] = []
        self.n = 0

    @property
    def logits(self) -> bool:
        return self.signals.logits

    @torch.no_grad()
    def add(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> None:
        if not self.terms:
            self.terms = [_Term(self.signals.kind(i), self.signals.axis(i)) for i in range(len(teacher))]
        self.n += student[0].shape[0] if student[0].dim() else 1
        for term, s, t in zip(self.terms, student, teacher):
            term.add(s, t)

    def _mean(self, values: list[float | None]) -> float | None:
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    @property
    def mean_kl(self) -> float | None:
        return self._mean([t.kl for t in self.terms if t.kind in ("class", "sequence")])

    @property
    def top1(self) -> float | None:
        """Top-1 agreement of the class/sequence outputs (the lowest where there are several)."""
        values = [t.top1 for t in self.terms if t.kind in ("class", "sequence") and t.top1 is not None]
        return min(values) if values else None

    @property
    def nmse(self) -> float | None:
        return self._mean([t.nmse for t in self.terms if t.kind == "dense"])

    @property
    def score(self) -> float:
        if not self.terms:
            return float("-inf")
        value = -sum(t.distance for t in self.terms) / len(self.terms)
        return value if value == value else float("-inf")  # NaN -> worst

    def per_sample(self) -> torch.Tensor:
        """Each sample's distance to the teacher (mean over the outputs): their mean is ``-score``."""
        return torch.stack([t.per_sample() for t in self.terms]).mean(0) if self.terms else torch.zeros(0)

    def as_dict(self) -> dict:
        out: dict = {}
        if self.mean_kl is not None:
            out["kl"] = self.mean_kl
            out["top1_agreement"] = self.top1
        binary = [t for t in self.terms if t.kind == "binary"]
        if binary:
            out["binary_kl"] = self._mean([t.kl for t in binary])
        if self.nmse is not None:
            out["nmse"] = self.nmse
        out["samples"] = self.n
        return out


@dataclass(frozen=True)
class PairedComparison:
    """A candidate against a baseline on the same samples, from their per-sample distances to the teacher."""

    gain: float  # mean of (baseline - candidate): > 0 when the candidate is closer on average
    standard_error: float  # of that mean (0 for a single sample)
    baseline: float  # the baseline's mean distance
    closer: int  # samples on which the candidate is closer
    farther: int  # ... and farther (ties count for neither)

    @property
    def relative_gain(self) -> float:
        return self.gain / self.baseline if self.baseline > 0 else 0.0  # a baseline at distance 0 cannot be beaten

    def better(self, z: float, margin: float) -> bool:
        """Closer on average by more than ``z`` standard errors, or by more than ``margin`` of the baseline's
        distance, unless a sign test resolves it as farther on most samples. The second route is for small
        selection splits with heavy-tailed distances, where a model closer by a third is not "significant" yet is
        the better one; gains under the margin that the standard error cannot resolve are treated as noise. The
        sign test guards both routes against the same tail the other way, a mean moved by a few samples while most
        samples got farther: it vetoes when the surplus of farther samples exceeds ``z`` standard deviations of a
        fair coin's (docs/decisions.md)."""
        resolved_farther = self.farther - self.closer > z * math.sqrt(self.closer + self.farther)
        return (self.gain > 0 and (self.gain > z * self.standard_error or self.relative_gain > margin)
                and not resolved_farther)

    def as_dict(self) -> dict:
        return {"improvement": self.gain, "relative_improvement": self.relative_gain,
                "standard_error": self.standard_error, "closer_samples": self.closer, "farther_samples": self.farther}


def paired_improvement(candidate: Agreement, baseline: Agreement) -> PairedComparison:
    """How much closer to the teacher ``candidate`` is than ``baseline`` on the same samples."""
    base = baseline.per_sample()
    diff = base - candidate.per_sample()
    if diff.numel() == 0:
        return PairedComparison(0.0, 0.0, 0.0, 0, 0)
    se = float(diff.std(unbiased=True) / math.sqrt(diff.numel())) if diff.numel() > 1 else 0.0
    return PairedComparison(float(diff.mean()), se, float(base.mean()), int((diff > 0).sum()), int((diff < 0).sum()))
