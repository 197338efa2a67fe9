"""Frozen, validated configuration. Messages name the CLI flag, the bad value and what is allowed."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace

from onnxsparse.validate import boolean, check, int_at_least, number_in, one_of, optional_int_at_least

METHODS = ("unipts", "magnitude", "global-magnitude", "reconstruct")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_PATTERN = re.compile(r"^(unstructured|channel|(\d+):(\d+))$")
SAVE_FORMATS = ("dense", "sparse-initializer")
QUANTIZE_FORMATS = ("int8",)


# UniPTSConfig fields the CLI sets, by the flag that sets them; the others are named as the library's field.
_UNIPTS_FLAGS = {"population": "--population", "generations": "--search-generations", "epochs": "--epochs",
                 "iterations": "--iterations", "lr": "--lr", "feature_weight": "--feature-weight",
                 "time_budget": "--time-budget", "augment": "--augment",
                 "fake_quant_fraction": "--fake-quant-fraction", "channel_regrow": "--channel-regrow"}


def _unipts_flag(name: str) -> str:
    return _UNIPTS_FLAGS.get(name, f"UniPTSConfig.{name}")


@dataclass(frozen=True)
class UniPTSConfig:
    """UniPTS hyperparameters. Defaults are the quick recipe; :meth:`paper` gives the official one."""

    # reducing-regrowing allocation search
    search: bool = True
    population: int = 12
    generations: int = 8
    parents: int = 5
    crossover: int = 5  # children per generation: crossover + mutation, the rest of the population random
    mutation: int = 5
    mutation_prob: float = 0.1
    regrow: float = 0.05  # R = regrow * N weights, and the "reduce" step prunes P + regrow
    max_layer_sparsity: float = 0.99  # s_max of the clamp
    fitness_samples: int = 256
    # distillation + dynamic sparse training. None: what the work plan fits (methods/unipts/plan.py, at most 80)
    epochs: float | None = None
    iterations: int | None = None  # overrides epochs
    # the training batch is PruneConfig.batch_size (--batch-size), the one every method and phase uses
    lr: float | None = None  # None: 0.05 (measured on the sample with T = 1; the paper preset uses 0.01 with T = 4)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    tau0: float = 8.0
    gamma: float | None = None  # None: 0.99 ** (100 / epochs), the paper's decay spread over the run
    # T = 1: the base-decayed KL then pulls the student toward the teacher itself; the paper's T = 4 pulls the
    # student's T = 1 softmax toward the teacher's T = 4 one, which collapses label-smoothed teachers' logits
    temperature: float = 1.0
    pruned_decay: float = 5e-5  # lambda of the straight-through gradient
    # weight of the layer-output term (normalised MSE of every prunable layer's output against the teacher's)
    # beside the output distillation; 0: outputs only, as in the paper
    feature_weight: float = 1.0
    # an optional wall-clock cap, in seconds, on search + training (None: none; the work plan alone decides). A run
    # it cuts depends on the machine's speed: not reproducible, and the report says so
    time_budget: float | None = None
    # random crops (+ flips where the teacher is mirror-invariant) of the training split. Off: on calibration sets
    # of hundreds of images it helped nowhere and hurt text models (docs/decisions.md); the paper preset keeps it
    augment: bool = False
    # BatchNorm during distillation: "frozen" runs it in eval mode (dense statistics kept, affine parameters
    # trained); "train" normalises with batch statistics and updates the running ones (the paper's setting)
    batchnorm: str = "frozen"
    # global gradient-norm clip per step (None: none). With frozen BatchNorm a channel of tiny running variance
    # multiplies its gradient by gamma / sqrt(var + eps)
    max_grad_norm: float | None = 1.0
    # with --quantize int8: a second candidate replays this fraction of the training iterations with fake int8
    # weights and activations; the quantize stage keeps the closer int8 model (0: no such candidate)
    fake_quant_fraction: float = 0.1
    # --pattern channel: fraction of each group's kept channels swapped at the first regrowth point (None: the
    # channel masks stay fixed; off by default, docs/decisions.md)
    channel_regrow: float | None = None

    def __post_init__(self) -> None:
        flag = _unipts_flag
        for name in ("population", "generations", "parents", "fitness_samples"):
            int_at_least(getattr(self, name), flag(name))
        for name in ("crossover", "mutation"):
            int_at_least(getattr(self, name), flag(name), minimum=0)
        check(self.parents <= self.population,
               f"{flag('parents')} must be <= {flag('population')} ({self.population}), got {self.parents}")
        check(self.crossover + self.mutation <= self.population,
               f"{flag('population')} must be at least {flag('crossover')} + {flag('mutation')} "
               f"({self.crossover} + {self.mutation}: the children of each generation), got {self.population}")
        number_in(self.mutation_prob, flag("mutation_prob"), 0, 1)
        number_in(self.regrow, flag("regrow"), 0, 1, hi_open=True)
        number_in(self.max_layer_sparsity, flag("max_layer_sparsity"), 0, 1, lo_open=True)
        if self.epochs is not None:
            number_in(self.epochs, flag("epochs"), 0, 1e6)
        optional_int_at_least(self.iterations, flag("iterations"), minimum=0)
        if self.lr is not None:
            number_in(self.lr, flag("lr"), 0, 10, lo_open=True)
        number_in(self.momentum, flag("momentum"), 0, 1, hi_open=True)
        number_in(self.weight_decay, flag("weight_decay"), 0, 1)
        number_in(self.warmup_epochs, flag("warmup_epochs"), 0, 1e6)
        number_in(self.tau0, flag("tau0"), 0, 1e3, lo_open=True)
        if self.gamma is not None:
            number_in(self.gamma, flag("gamma"), 0, 1, lo_open=True)
        number_in(self.temperature, flag("temperature"), 0, 1e3, lo_open=True)
        number_in(self.pruned_decay, flag("pruned_decay"), 0, 1)
        number_in(self.feature_weight, flag("feature_weight"), 0, 1e3)
        if self.time_budget is not None:
            number_in(self.time_budget, flag("time_budget"), 0, 1e7, lo_open=True)
        if self.max_grad_norm is not None:
            number_in(self.max_grad_norm, flag("max_grad_norm"), 0, 1e6, lo_open=True)
        number_in(self.fake_quant_fraction, flag("fake_quant_fraction"), 0, 1)
        if self.channel_regrow is not None:
            number_in(self.channel_regrow, flag("channel_regrow"), 0, 1, lo_open=True)
        check(self.batchnorm in ("frozen", "train"),
               f"{flag('batchnorm')} must be 'frozen' or 'train', got {self.batchnorm!r}")

    def with_population(self, population: int) -> UniPTSConfig:
        """This recipe with a population of ``population``: parents and children scaled in proportion, so that the
        children still fit (``--population`` alone gives a valid search)."""
        int_at_least(population, "--population")
        scale = population / self.population
        return replace(self, population=population, parents=max(1, min(population, round(self.parents * scale))),
                       crossover=int(self.crossover * scale), mutation=int(self.mutation * scale))

    @classmethod
    def paper(cls, **overrides) -> UniPTSConfig:
        """The official recipe: 25 x 25 search, 10 parents, 12 + 12 children, 100 epochs, lr 0.01, T = 4."""
        base = dict(population=25, generations=25, parents=10, crossover=12, mutation=12, epochs=100.0,
                    fitness_samples=10_240, lr=0.01, temperature=4.0, time_budget=None, batchnorm="train", max_grad_norm=None,
                    augment=True, feature_weight=0.0)
        base.update(overrides)
        return cls(**base)


@dataclass(frozen=True)
class PruneConfig:
    """Everything one pruning run needs besides the model and the calibration data."""

    sparsity: float
    method: str = "unipts"
    pattern: str = "unstructured"
    seed: int = 0
    device: str = "auto"
    exclude: tuple[str, ...] = ()
    correction: bool = True
    batch_size: int = 64
    max_samples: int | None = None
    selection_size: int | None = None
    correction_samples: int = 256
    verify_size: int | None = None  # the verification split (None: 10% of the samples within 32..1000)
    verify_tolerance: float = 1e-3
    # quality gate: the lowest per-output agreement with the dense model on the selection (top-1 for class
    # outputs, per position for sequences, R^2 for other outputs) must reach this, else nothing is written
    min_agreement: float = 0.8
    checkpoint_every: int = 5  # epochs between training checkpoints (when the run has a run directory)
    save_format: str = "dense"
    # CUDA: deterministic algorithms, TF32 and bf16 autocast off (slower; the CPU is reproducible without it)
    deterministic: bool = False
    # int8: the final sparse model is quantized (QDQ, per-channel symmetric int8 weights) where that is faster
    # and agrees with the dense model within onnxsparse.quantize.search.MAX_AGREEMENT_DROP of the float one
    quantize: str | None = None
    # --pattern channel: kept channels of a group rounded to a multiple of this where the group's size is one
    # (onnxruntime's CPU convolutions block channels by 16 with AVX-512, 8 with AVX2; see benchmarks/channels.py)
    channel_multiple: int = 16
    unipts: UniPTSConfig = field(default_factory=UniPTSConfig)

    def __post_init__(self) -> None:
        number_in(self.sparsity, "--sparsity", 0, 1, hi_open=True)
        one_of(self.method, "--method", METHODS)
        match = _PATTERN.match(str(self.pattern))
        check(match is not None, f"--pattern must be 'unstructured', 'channel' or N:M (e.g. 2:4), got {self.pattern!r}")
        if match and match.group(2):
            n, m = int(match.group(2)), int(match.group(3))
            check(0 < n < m, f"--pattern N:M needs 0 < N < M, got {self.pattern!r}")
        int_at_least(self.seed, "--seed", minimum=0)
        check(isinstance(self.device, str) and _DEVICE.match(self.device) is not None,
               f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        check(isinstance(self.exclude, tuple), f"exclude must be a tuple of patterns, got {type(self.exclude).__name__}")
        int_at_least(self.batch_size, "--batch-size")
        optional_int_at_least(self.max_samples, "--max-samples", minimum=2)
        optional_int_at_least(self.selection_size, "--selection-size", minimum=0)
        int_at_least(self.correction_samples, "--correction-samples")
        optional_int_at_least(self.verify_size, "--verify-size", minimum=0)
        number_in(self.verify_tolerance, "--verify-tolerance", 0, 1, lo_open=True)
        number_in(self.min_agreement, "--min-agreement", 0, 1)
        int_at_least(self.checkpoint_every, "--checkpoint-every")
        boolean(self.deterministic, "--deterministic")
        int_at_least(self.channel_multiple, "--channel-multiple")
        one_of(self.save_format, "--save-format", SAVE_FORMATS)
        check(self.quantize is None or self.quantize in QUANTIZE_FORMATS,
               f"--quantize must be one of {', '.join(QUANTIZE_FORMATS)} (or not given), got {self.quantize!r}")

    @property
    def nm(self) -> tuple[int, int] | None:
        match = _PATTERN.match(self.pattern)
        return (int(match.group(2)), int(match.group(3))) if match and match.group(2) else None

    def as_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "unipts"}
        out["exclude"] = list(self.exclude)
        out["unipts"] = {f.name: getattr(self.unipts, f.name) for f in fields(self.unipts)}
        return out
