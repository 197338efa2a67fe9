"""The quick recipe's work plan, from counted quantities: the model's multiply-accumulates, sample counts and
layers, never from wall time, so the same command, seed, device and thread count do the same work anywhere.

Work is counted in MAC-equivalents: one forward pass of one sample costs the multiply-accumulates of its
prunable layers plus :data:`ACTIVATION_WEIGHT` per element those layers output (the elementwise work around them:
normalisation, activations; it dominates small depthwise layers), ``work_per_sample``. The recipe spends at most :data:`WORK_BUDGETS` of them (per device type) on search + training
(:data:`SEARCH_SHARE` of it on the search): a search generation costs ``population`` candidates, each a forward of
the fitness samples times the correction mode's factor; a training step costs ``TRAIN_STEP_FACTOR`` forwards of a
batch (the student's forward and backward, the teacher's forward). Training runs :data:`MAX_EPOCHS` epochs where
that fits, fewer where it does not (at least one); the search runs the recipe's generations where they fit, fewer
where they do not, none where not one does.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from onnxsparse.config import UniPTSConfig
from onnxsparse.methods.unipts.dst import TrainPlan

# MAC-equivalents for search + training, by device type (the device is part of what a reproducible command
# names). CPU: a PP-LCNet classifier at 224x224 (0.15 GMAC and 2.5 M output elements per sample) finishes the
# quick recipe in under 10 minutes on a 2-core CPU (docs/decisions.md). CUDA: 400x that, about 20 epochs of a
# ResNet-50 at 224 on 1,024 images (sized from the GPU's throughput, not measured by this plan)
WORK_BUDGETS = {"cpu": 5e12, "cuda": 2e15}
# fitted on single-thread forwards of five CNNs: time ~ MACs + 50 x output elements (docs/decisions.md)
ACTIVATION_WEIGHT = 50.0
SEARCH_SHARE = 0.3
MAX_EPOCHS = 80.0
TRAIN_STEP_FACTOR = 4.0  # student forward + backward (~3 forwards) and the teacher's forward
# Cost of a fitness candidate per correction mode, in forwards of the fitness samples: the statistics modes
# run extra passes (BatchNorm re-estimation, per-channel statistics of every layer's output)
MODE_FACTORS = {"none": 1.0, "reestimate": 5.0, "channel": 7.0, "relative": 14.0}
DEFAULT_LR = 0.05  # with the default T = 1 (config.UniPTSConfig.lr)


def work_per_sample(module: nn.Module, layers: Sequence, batch: Sequence[torch.Tensor]) -> tuple[int, int]:
    """(multiply-accumulates, output elements) of one sample's forward pass through the prunable ``layers`` of
    ``module``: each layer's weight count times the positions its output is computed at (H*W for a convolution,
    tokens for a MatMul, 1 for a fully connected layer), and the elements it outputs."""
    counted: dict[str, tuple[int, int]] = {}
    hooks = []
    for layer in layers:
        def hook(_module, _inputs, out, layer=layer):
            out = out[0] if isinstance(out, (tuple, list)) else out
            per_sample = out.numel() // max(out.shape[0], 1) if out.dim() else 1
            channels = out.shape[layer.out_axis_act] if out.dim() > abs(layer.out_axis_act) else 1
            counted[layer.name] = (layer.numel * max(per_sample // max(channels, 1), 1), per_sample)
        hooks.append(module.get_submodule(layer.module_path).register_forward_hook(hook))
    try:
        with torch.no_grad():
            module(*[t[:1] for t in batch])
    finally:
        for h in hooks:
            h.remove()
    return sum(m for m, _ in counted.values()), sum(a for _, a in counted.values())


@dataclass(frozen=True)
class WorkPlan:
    macs_per_sample: int
    activations_per_sample: int
    work_per_sample: float  # MAC-equivalents of one sample's forward
    work_budget: float
    fitness_samples: int
    population: int
    candidate_mode: str
    generations: int  # search generations that fit (0: no search)
    iterations_per_epoch: int
    iterations: int
    epochs: float
    search_work: float
    training_work: float
    reason: str  # why the generations or epochs are below the recipe's, "" when they are not

    def as_dict(self) -> dict:
        return asdict(self)


def plan_work(macs_per_sample: int, activations_per_sample: int, *, n_train: int, batch_size: int,
              fitness_samples: int, population: int, generations: int, mode: str, search: bool,
              device_type: str = "cpu", work_budget: float | None = None) -> WorkPlan:
    """Search generations and training iterations that fit ``work_budget`` (default: the device type's, in
    :data:`WORK_BUDGETS`; module docstring)."""
    work_budget = WORK_BUDGETS.get(device_type, WORK_BUDGETS["cpu"]) if work_budget is None else work_budget
    unit = max(macs_per_sample + ACTIVATION_WEIGHT * activations_per_sample, 1.0)
    train_bs = min(batch_size, n_train)
    per_epoch = max(n_train // max(train_bs, 1), 1)
    candidate = fitness_samples * unit * MODE_FACTORS.get(mode, max(MODE_FACTORS.values()))
    step = TRAIN_STEP_FACTOR * train_bs * unit
    reasons = []
    planned_generations = 0
    if search:
        planned_generations = min(generations, int(SEARCH_SHARE * work_budget // (population * candidate)))
        if planned_generations < generations:
            reasons.append(f"{planned_generations} of {generations} search generations fit the search's share of "
                           f"the work budget ({population} candidates at {candidate:.3g} MAC-equivalents each)")
    search_work = planned_generations * population * candidate
    full = int(round(MAX_EPOCHS * per_epoch))
    iterations = min(full, max(int((work_budget - search_work) // step), per_epoch))  # at least one epoch
    if iterations < full:
        reasons.append(f"{iterations / per_epoch:.1f} of {MAX_EPOCHS:g} epochs fit the work budget "
                       f"({step:.3g} MAC-equivalents a step)")
    return WorkPlan(int(macs_per_sample), int(activations_per_sample), unit, work_budget, fitness_samples,
                    population, mode, planned_generations, per_epoch, iterations, iterations / per_epoch, search_work,
                    iterations * step, "; ".join(reasons))


def search_budget_s(cfg: UniPTSConfig, started: float) -> float | None:
    """Seconds left to the search under ``--time-budget`` (its :data:`SEARCH_SHARE`), None without one."""
    if cfg.time_budget is None:
        return None
    return max(SEARCH_SHARE * cfg.time_budget - (time.perf_counter() - started), 0.0)


def train_plan(cfg: UniPTSConfig, work: WorkPlan, started: float) -> TrainPlan:
    """The work plan's iterations, or the ``--epochs``/``--iterations`` given; ``--time-budget`` caps them (what
    is left of it once the search and the start are done, ``started`` being the run's start)."""
    per_epoch = work.iterations_per_epoch
    if cfg.iterations is not None:
        iterations = cfg.iterations
    elif cfg.epochs is not None:
        iterations = int(round(cfg.epochs * per_epoch))
    else:
        iterations = work.iterations
    warmup = min(int(round(cfg.warmup_epochs * per_epoch)), iterations // 4)
    budget = None
    if cfg.time_budget is not None:
        budget = max(cfg.time_budget - (time.perf_counter() - started), 0.0)
    return TrainPlan(iterations=iterations, iterations_per_epoch=per_epoch, warmup=warmup,
                     lr=cfg.lr if cfg.lr is not None else DEFAULT_LR, momentum=cfg.momentum,
                     weight_decay=cfg.weight_decay, budget_s=budget)
