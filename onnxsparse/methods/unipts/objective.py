"""Base-decayed distillation objective (UniPTS section 1) and label-free agreement measures, per output.

What is compared for each output is described once per run by :mod:`onnxsparse.methods.signals` (the logits
behind a trailing Softmax, not the probabilities). Per kind:

* ``class`` ``(N, C)`` logits: the base-decayed KL::

      F.kl_div(F.log_softmax(z_s, 1) / tau_e, F.softmax(z_t / T, 1), reduction="sum") * T**2 / B
      tau_e = tau0 * gamma**epoch

* ``sequence`` logits (a class axis and other positions, e.g. CTC ``(N, T, C)``): the same KL per position,
  summed over classes and averaged over every position;
* ``binary`` (logits behind a Sigmoid): the Bernoulli KL per element, averaged;
* ``dense``: the normalised MSE ``mean((s - t)^2) / (var(t) + eps)``, so each output weighs the same whatever
  its scale.

Several outputs: the mean of their terms (all are distilled). With ``feature_weight`` > 0 the loss adds that
weight times the normalised MSE of every prunable layer's output against the teacher's (averaged over the
layers): a signal per layer, which the outputs alone give only through the whole network.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from onnxsparse.methods.signals import Signals
from onnxsparse.sparsity.correction import submodule_hooks

import torch
import torch.nn.functional as F

_EPS = 1e-8

KL_NAME = "base-decayed KL on class logits (tau0 * gamma**epoch, T)"
MSE_NAME = "normalised MSE per output (mean squared error / teacher variance), averaged over outputs"
LOSS_NAMES = {
    "class": "base-decayed KL over classes (tau0 * gamma**epoch, T)",
    "sequence": "base-decayed KL over classes per position, averaged over positions (tau0 * gamma**epoch, T)",
    "binary": "Bernoulli KL per element of the logits behind Sigmoid",
    "dense": "normalised MSE (mean squared error / teacher variance)",
}


def default_gamma(epochs: float) -> float:
    """The paper's 0.99 per epoch over 100 epochs, stretched so the decay spans ``epochs``."""
    return 0.99 ** (100.0 / max(float(epochs), 1e-6))


def tau_at(epoch: float, tau0: float, gamma: float) -> float:
    return float(tau0 * gamma ** epoch)


def base_decayed_kl(z_s: torch.Tensor, z_t: torch.Tensor, tau_e: float, temperature: float) -> torch.Tensor:
    b = z_s.shape[0]
    return F.kl_div(
        F.log_softmax(z_s.float(), 1) / tau_e, F.softmax(z_t.float() / temperature, 1), reduction="sum"
    ) * temperature ** 2 / b


def _classes_last(z: torch.Tensor, axis: int) -> torch.Tensor:
    """``z`` with its class axis last, flattened to ``(positions, C)``."""
    return z.movedim(axis, -1).reshape(-1, z.shape[axis])


def sequence_kl(z_s: torch.Tensor, z_t: torch.Tensor, axis: int, tau_e: float, temperature: float) -> torch.Tensor:
    """Base-decayed KL over the class axis, averaged over every other position (batch included)."""
    s, t = _classes_last(z_s.float(), axis), _classes_last(z_t.float(), axis)
    return F.kl_div(F.log_softmax(s, 1) / tau_e, F.softmax(t / temperature, 1), reduction="sum") \
        * temperature ** 2 / s.shape[0]


def bernoulli_kl(z_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    """Mean KL(Bernoulli(sigmoid(z_t)) || Bernoulli(sigmoid(z_s))) over elements."""
    z_s, z_t = z_s.float(), z_t.float()
    q = torch.sigmoid(z_t)
    return (F.binary_cross_entropy_with_logits(z_s, q, reduction="mean")
            - F.binary_cross_entropy_with_logits(z_t, q, reduction="mean"))


def normalised_mse(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    terms = []
    for s, t in zip(student, teacher):
        s, t = s.float(), t.float()
        terms.append(F.mse_loss(s, t) / (t.var(unbiased=False) + _EPS))
    return torch.stack(terms).mean()


@contextlib.contextmanager
def layer_outputs(module: torch.nn.Module, paths: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """The outputs of ``module``'s submodules at ``paths`` during the forwards run inside the block."""
    store: dict[str, torch.Tensor] = {}

    def hook_for(path: str):
        def hook(_module, _inp, out):
            store[path] = out

        return hook

    with submodule_hooks(module, {path: hook_for(path) for path in paths}):
        yield store


class Distillation:
    """The loss for one model: a term per output by its kind (see the module docstring), averaged, plus
    ``feature_weight`` times the layer-output term over the modules at ``feature_paths``."""

    def __init__(self, signals: Signals | bool, *, tau0: float, gamma: float, temperature: float,
                 feature_weight: float = 0.0, feature_paths: Sequence[str] = ()):
        self.signals = Signals.of(signals)
        self.tau0 = tau0
        self.gamma = gamma
        self.temperature = temperature
        self.feature_weight = float(feature_weight)
        self.feature_paths = tuple(dict.fromkeys(feature_paths)) if feature_weight > 0 else ()

    def forward(self, model: torch.nn.Module, student: torch.nn.Module, teacher: torch.nn.Module,
                batch: tuple[torch.Tensor, ...], epoch: float) -> torch.Tensor:
        """The loss of one batch: the teacher's forward without gradients, the student's through ``model``
        (``student`` itself, or its DistributedDataParallel wrapper) with them."""
        with torch.no_grad(), layer_outputs(teacher, self.feature_paths) as t_feats:
            t_out = self.signals.forward(teacher, batch)
        with layer_outputs(student, self.feature_paths) as s_feats:
            s_out = self.signals.forward(model, batch)
        loss = self(s_out, t_out, epoch)
        if self.feature_paths:
            paths = [p for p in self.feature_paths if p in s_feats and p in t_feats]
            if paths:
                loss = loss + self.feature_weight * normalised_mse([s_feats[p] for p in paths],
                                                                   [t_feats[p] for p in paths])
        return loss

    @property
    def logits(self) -> bool:
        return self.signals.logits

    @property
    def name(self) -> str:
        if not self.signals:
            name = MSE_NAME
        elif len(self.signals) == 1:
            name = KL_NAME if self.signals.kind(0) == "class" else LOSS_NAMES[self.signals.kind(0)]
        else:
            name = "; ".join(f"{s.output or i}: {LOSS_NAMES[s.kind]}" for i, s in enumerate(self.signals))
        if self.feature_paths:
            name += (f"; + {self.feature_weight:g} x normalised MSE of {len(self.feature_paths)} layer outputs "
                     "(mean over layers)")
        return name

    def tau(self, epoch: float) -> float:
        return tau_at(epoch, self.tau0, self.gamma)

    def __call__(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], epoch: float) -> torch.Tensor:
        if not self.signals:
            return normalised_mse(student, teacher)
        terms = []
        for i, (s, t) in enumerate(zip(student, teacher)):
            kind = self.signals.kind(i)
            if kind == "class":
                terms.append(base_decayed_kl(s, t, self.tau(epoch), self.temperature))
            elif kind == "sequence":
                terms.append(sequence_kl(s, t, self.signals.axis(i), self.tau(epoch), self.temperature))
            elif kind == "binary":
                terms.append(bernoulli_kl(s, t))
            else:
                terms.append(normalised_mse([s], [t]))
        return terms[0] if len(terms) == 1 else torch.stack(terms).mean()


class _Term:
    """Running sums for one compared tensor."""

    def __init__(self, kind: str, axis: int):
        self.kind, self.axis = kind, axis
        self.divergence = 0.0  # summed KL (class / sequence / binary)
        self.positions = 0  # distributions (class, sequence) or elements (binary) seen
        self.agree = 0
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
            self.agree += int((s2.argmax(1) == t2.argmax(1)).sum())
            self.positions += s2.shape[0]
            return
        if self.kind == "binary":
            q = torch.sigmoid(t)
            elements = (F.binary_cross_entropy_with_logits(s, q, reduction="none")
                        - F.binary_cross_entropy_with_logits(t, q, reduction="none"))
            self.divergence += float(elements.sum())
            self.samples.append(elements.double().reshape(n, -1).mean(1).cpu())
            self.agree += int(((s > 0) == (t > 0)).sum())
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
        return self.agree / self.positions if self.kind != "dense" and self.positions else None

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
    Bernoulli KL and sign agreement for binary logits, the normalised MSE (1 - R^2) for dense outputs.
    ``score`` is higher-is-better: minus the mean of the per-output distances.
    """

    def __init__(self, signals: Signals | bool):
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
        holdouts with heavy-tailed distances, where a model closer by a third is not "significant" yet is the
        better one; gains under the margin that the standard error cannot resolve are treated as noise. The sign
        test guards both routes against the same tail the other way, a mean moved by a few samples while most
        samples got farther: it vetoes when the surplus of farther samples exceeds ``z`` standard deviations of
        a fair coin's (measured on the PP-OCR line classifier: at 0.9, 19% closer on average but farther on 40
        of 52 holdout samples, 4.3 points under its start on the test lines, vetoed; at 0.7, 49% closer and
        farther on 29 of 52, 1.2 points above its start, kept)."""
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
