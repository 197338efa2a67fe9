"""Base-decayed distillation objective (UniPTS section 1) and label-free agreement measures, per output.

What is compared for each output is described once per run by :mod:`onnxsparse.signals` (the logits
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
from collections.abc import Iterator, Sequence

from onnxsparse.metrics import _classes_last
from onnxsparse.signals import Signals
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

    def __init__(self, signals: Signals, *, tau0: float, gamma: float, temperature: float,
                 feature_weight: float = 0.0, feature_paths: Sequence[str] = ()):
        self.signals = Signals.of(signals)
        self.tau0 = tau0
        self.gamma = gamma
        self.temperature = temperature
        self.feature_weight = float(feature_weight)
        self.feature_paths = tuple(dict.fromkeys(feature_paths)) if feature_weight > 0 else ()

    def forward(self, model: torch.nn.Module, student: torch.nn.Module, teacher: torch.nn.Module,
                batch: tuple[torch.Tensor, ...], epoch: float) -> torch.Tensor:
        """The loss of one batch: the teacher's forward without gradients and in fp32 whatever autocast the
        caller runs under (its targets are not rounded to bf16), the student's through ``model`` (``student``
        itself, or its DistributedDataParallel wrapper) with them."""
        fp32 = torch.autocast(batch[0].device.type, enabled=False)
        with torch.no_grad(), fp32, layer_outputs(teacher, self.feature_paths) as t_feats:
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
