"""Base-decayed distillation objective (UniPTS section 1) and label-free agreement measures.

Class logits (a single 2-D ``(N, C > 1)`` float output) use the base-decayed KL::

    F.kl_div(F.log_softmax(z_s, 1) / tau_e, F.softmax(z_t / T, 1), reduction="sum") * T**2 / B
    tau_e = tau0 * gamma**epoch

Any other output signature (several outputs, detection heads, embeddings, 1-class or N-D outputs) uses the
normalised MSE fallback: per output, ``mean((s - t)^2) / (var(t) + eps)``, averaged over the outputs, so each
output weighs the same whatever its scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

_EPS = 1e-8

KL_NAME = "base-decayed KL on class logits (tau0 * gamma**epoch, T)"
MSE_NAME = "normalised MSE per output (mean squared error / teacher variance), averaged over outputs"


def as_outputs(out) -> list[torch.Tensor]:
    """A module's output as a flat list of tensors (a GraphModule returns a tensor, tuple or list)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    flat: list[torch.Tensor] = []
    for item in out:
        flat.extend(as_outputs(item))
    return flat


def is_class_logits(outputs: Sequence[torch.Tensor]) -> bool:
    """One 2-D ``(N, C > 1)`` float output."""
    return (
        len(outputs) == 1
        and outputs[0].dim() == 2
        and outputs[0].shape[1] > 1
        and outputs[0].is_floating_point()
    )


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


def normalised_mse(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    terms = []
    for s, t in zip(student, teacher):
        s, t = s.float(), t.float()
        terms.append(F.mse_loss(s, t) / (t.var(unbiased=False) + _EPS))
    return torch.stack(terms).mean()


class Distillation:
    """The loss for one model: KL for class logits, normalised MSE otherwise."""

    def __init__(self, logits: bool, *, tau0: float, gamma: float, temperature: float):
        self.logits = logits
        self.tau0 = tau0
        self.gamma = gamma
        self.temperature = temperature

    @property
    def name(self) -> str:
        return KL_NAME if self.logits else MSE_NAME

    def tau(self, epoch: float) -> float:
        return tau_at(epoch, self.tau0, self.gamma)

    def __call__(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], epoch: float) -> torch.Tensor:
        if self.logits:
            return base_decayed_kl(student[0], teacher[0], self.tau(epoch), self.temperature)
        return normalised_mse(student, teacher)


class Agreement:
    """Label-free closeness of student outputs to cached teacher outputs, accumulated over batches.

    For class logits: mean KL(teacher || student) at temperature 1 and top-1 agreement. Otherwise: the
    normalised MSE per output (sum of squared errors / sum of squared deviations of the teacher from its
    mean, i.e. 1 - R^2), averaged over outputs. ``score`` is higher-is-better (negative KL or negative NMSE).
    """

    def __init__(self, logits: bool):
        self.logits = logits
        self.n = 0
        self.kl = 0.0
        self.agree = 0
        self.sse: list[float] = []
        self.st: list[float] = []
        self.s1: list[float] = []
        self.count: list[int] = []

    @torch.no_grad()
    def add(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> None:
        if self.logits:
            s, t = student[0].float(), teacher[0].float()
            self.n += s.shape[0]
            log_s, log_t = F.log_softmax(s, 1), F.log_softmax(t, 1)
            self.kl += float((log_t.exp() * (log_t - log_s)).sum())
            self.agree += int((s.argmax(1) == t.argmax(1)).sum())
            return
        if not self.sse:
            k = len(teacher)
            self.sse, self.st, self.s1, self.count = [0.0] * k, [0.0] * k, [0.0] * k, [0] * k
        self.n += student[0].shape[0] if student[0].dim() else 1
        for i, (s, t) in enumerate(zip(student, teacher)):
            s, t = s.double(), t.double()
            self.sse[i] += float(((s - t) ** 2).sum())
            self.st[i] += float((t ** 2).sum())
            self.s1[i] += float(t.sum())
            self.count[i] += t.numel()

    @property
    def mean_kl(self) -> float | None:
        return self.kl / self.n if self.logits and self.n else None

    @property
    def top1(self) -> float | None:
        return self.agree / self.n if self.logits and self.n else None

    @property
    def nmse(self) -> float | None:
        if self.logits or not self.sse:
            return None
        vals = []
        for sse, st, s1, c in zip(self.sse, self.st, self.s1, self.count):
            var = st - s1 * s1 / max(c, 1)
            vals.append(sse / max(var, _EPS))
        return sum(vals) / len(vals)

    @property
    def score(self) -> float:
        value = -self.mean_kl if self.logits else -self.nmse
        return value if value == value else float("-inf")  # NaN -> worst

    def as_dict(self) -> dict:
        if self.logits:
            return {"kl": self.mean_kl, "top1_agreement": self.top1, "samples": self.n}
        return {"nmse": self.nmse, "samples": self.n}
