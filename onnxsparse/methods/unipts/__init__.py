"""UniPTS (Xie et al., CVPR 2024): reducing-regrowing allocation search, base-decayed distillation and
dynamic sparse training, label-free, on any imported model.

Phases (``MethodResult.info`` reports each):

1. allocation: the evolutionary search over reduce-regrow genomes (:mod:`.search`), scored by agreement with
   the dense teacher after statistics correction; the uniform and global-magnitude allocations are scored the
   same way and the fittest is kept. Every candidate respects the per-layer caps (``max_layer_sparsity``, and
   the global target for the first, last and small layers: :func:`onnxsparse.sparsity.allocation.layer_caps`);
2. start: two starting points for distillation, scored on the calibration selection: the magnitude-pruned model
   after the statistics correction that agrees best, and the layer-wise reconstruction of the same allocation
   (:func:`onnxsparse.methods.reconstruct.reconstruct_all`); the better one is trained;
3. training: dynamic sparse training with the per-output objective (:mod:`.dst`, :mod:`.objective`), on the
   signal each output describes (:mod:`onnxsparse.signals`: logits behind a Softmax, per position for
   sequences, ...), plus the distance of every prunable layer's output to the teacher's (``feature_weight``;
   the paper distils the outputs alone);
4. finish: masks baked (exactly the allotted zeros per layer), the statistics correction chosen again on the
   selection ("none" included), and the trained model kept only if it agrees with the dense model on the selection
   better than the starting point by a margin the selection can resolve (``KEEP_TRAINED_Z`` standard errors of
   the paired per-sample difference, or ``KEEP_TRAINED_MARGIN`` of the start's distance), unless a sign test
   resolves it as farther on most selection samples: UniPTS never ends below its own start on the selection.

The quick recipe plans its search generations and training iterations from counted work (:mod:`.plan`: the
model's multiply-accumulates and output elements, sample counts), so the same command, seed, device and thread
count give the same model on any machine. ``UniPTSConfig.time_budget`` is an optional wall-clock cap on top: a
run it cuts says so (report and stderr) and is not reproducible.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from datetime import datetime, timedelta

import numpy as np
import torch
from tqdm import tqdm

from onnxsparse.config import UniPTSConfig
from onnxsparse.errors import OnnxSparseError
from onnxsparse.methods.base import MethodResult, PruneContext, register_method
from onnxsparse.methods.scoring import FixedBatches
from onnxsparse.methods.unipts.dst import (
    FLIP_AGREEMENT,
    FLIP_SAMPLES,
    TrainPlan,
    flip_agreement,
    train,
    training_batches,
)
from onnxsparse.metrics import Agreement, paired_improvement
from onnxsparse.methods.unipts import plan as plan_module
from onnxsparse.methods.unipts.fakequant import train_last_part
from onnxsparse.methods.unipts.objective import Distillation, default_gamma
from onnxsparse.methods.unipts.plan import WorkPlan, plan_work, work_per_sample
from onnxsparse.methods.unipts.search import (
    EvolutionarySearch,
    FitnessEvaluator,
    fit_to_target,
    integer_zeros,
    sparsities_to_zeros,
    zeros_to_sparsities,
)
from onnxsparse.sparsity import allocation, patterns
from onnxsparse.sparsity.correction import correction_modes
from onnxsparse.plain import to_plain
from onnxsparse.sparsity.masks import attach_masks, bake_masks, current_masks
from onnxsparse.state import copy_state, load_state
from onnxsparse.timing import Phases
from onnxsparse.methods.reconstruct import reconstruct_all

logger = logging.getLogger(__name__)

DEFAULT_LR = 0.05  # with the default T = 1 (config.UniPTSConfig.lr)
# The trained model replaces its start when closer to the dense model on the selection split by more than
# KEEP_TRAINED_Z standard errors (one-sided 95%) or by more than KEEP_TRAINED_MARGIN of the start's distance: a
# few dozen samples cannot resolve a small gain, and heavy-tailed distances hide a large one (docs/decisions.md)
KEEP_TRAINED_Z = 1.645
KEEP_TRAINED_MARGIN = 0.10


def autocast_for(device: torch.device, deterministic: bool = False):
    """bf16 autocast on CUDA devices that support it (not with ``--deterministic``), nothing elsewhere."""
    if device.type == "cuda" and not deterministic and torch.cuda.is_bf16_supported():
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def _progress(ctx: PruneContext, total: int, desc: str):
    return tqdm(total=total, desc=desc, unit="it" if "train" in desc else "gen", disable=not ctx.progress,
                leave=False, dynamic_ncols=True)


def _announce(ctx: PruneContext, message: str) -> None:
    """A line for the user on stderr, and in the log. Written between progress bars (none is open then), and
    without tqdm.write, whose first call imports multiprocessing's locks: a Ctrl-C landing in that import
    broke the clean interruption."""
    logger.info(message)
    if ctx.progress:
        print(f"onnxsparse: {message}", file=sys.stderr, flush=True)


@register_method("unipts")
class UniPTS:
    name = "unipts"

    def run(self, ctx: PruneContext) -> MethodResult:
        cfg: UniPTSConfig = ctx.config.unipts
        started = time.perf_counter()
        phases = Phases()
        layers = ctx.layers
        autocast = autocast_for(ctx.device, ctx.config.deterministic)
        if ctx.calib.n_train < 2:
            raise OnnxSparseError(f"UniPTS needs at least 2 calibration training samples, got {ctx.calib.n_train}")
        signals = ctx.output_signals()
        info: dict = {"device": str(ctx.device), "autocast": "bf16" if autocast is not contextlib.nullcontext else None,
                      "threads": torch.get_num_threads() if ctx.device.type == "cpu" else None,
                      "signals": signals.as_list(), "time_budget_s": cfg.time_budget}
        first = next(iter(ctx.train_batches(1)))
        macs, activations = work_per_sample(ctx.teacher, layers, first)
        self._plan_for = lambda mode: plan_work(
            macs, activations, n_train=ctx.calib.n_train, batch_size=cfg.batch_size,
            fitness_samples=min(cfg.fitness_samples, ctx.calib.n_train), population=cfg.population,
            generations=cfg.generations, mode=mode, search=cfg.search and ctx.config.nm is None and len(layers) > 1,
            device_type=ctx.device.type)
        if cfg.time_budget is not None:
            eta = datetime.now() + timedelta(seconds=cfg.time_budget)
            _announce(ctx, f"UniPTS time budget {cfg.time_budget:.0f} s for search + training: the run is cut "
                           f"by about {eta:%H:%M:%S} where the planned work takes longer (a cut run is not "
                           "reproducible)")

        with phases("allocation"):
            fitness_batches = FixedBatches(ctx, "train", min(cfg.fitness_samples, ctx.calib.n_train),
                                           ctx.config.batch_size)
            evaluator = FitnessEvaluator(
                ctx.student, ctx.teacher, layers, fitness_batches(), signals=signals, correction="none",
                has_batchnorm=ctx.imported.has_batchnorm,
                channel_inputs=ctx.correction_inputs() if ctx.config.correction else None,
                autocast=contextlib.nullcontext,
            )  # fitness in fp32: bf16 would blur the ranking of close candidates
            zeros, pattern_masks, info["allocation"], resumed = self._allocate(ctx, cfg, evaluator, started)
            zeros = ctx.dist.broadcast_object(zeros)  # rank 0's choice, should float noise split the ranks

        with phases("start"):
            info["start"], start_state, zeros, masks = self._start(ctx, evaluator, zeros, pattern_masks)
            del evaluator
        sparsities = zeros_to_sparsities(zeros, layers)

        with phases("training"):
            info["training"], info["resumed"] = self._train(ctx, cfg, signals, masks, sparsities, autocast,
                                                            started, resumed, info["allocation"]["correction_mode"])

        with phases("finish"):
            final_masks = current_masks(ctx.student, layers)
            for i, layer in enumerate(layers):
                got = int((~final_masks[layer.name]).sum())
                if got != int(zeros[i]):
                    raise OnnxSparseError(f"internal error: layer {layer.name!r} mask has {got} zeros")
            bake_masks(ctx.student, layers)
            info["final_correction"], info["kept"] = self._finish(ctx, start_state, info["start"])
            if info["kept"] == "start":
                final_masks = {layer.name: layer.weight.get(ctx.student).detach() != 0 for layer in layers}
            self._check_finite(ctx)
        info["sparsities"] = sparsities
        info["time_s"] = {**phases.rounded(), "total": round(time.perf_counter() - started, 3)}
        return MethodResult(sparsities, final_masks, info, alternatives=self._alternatives)

    # ------------------------------------------------------------------------------------------------
    def _allocate(self, ctx: PruneContext, cfg: UniPTSConfig, evaluator: FitnessEvaluator, started: float):
        """(zeros per layer, N:M masks or None, report, resumed) — the search, or what a run directory kept."""
        layers = ctx.layers
        nm = ctx.config.nm
        pattern_masks = None
        if nm is not None:
            pattern_masks = patterns.pattern_masks(ctx.student, layers, ctx.config.pattern, {})
        saved = ctx.run_dir.load("allocation") if ctx.run_dir is not None else None
        if saved is not None:  # resumed run: the allocation was searched already
            evaluator.mode = saved["info"].get("correction_mode", evaluator.mode)
            return saved["zeros"].numpy(), pattern_masks, saved["info"], True
        target = float(ctx.config.sparsity)
        numels = [layer.numel for layer in layers]
        caps, protected = allocation.layer_caps(ctx.imported.proto, layers, target, cfg.max_layer_sparsity)
        fitness: dict[str, dict] = {}
        if nm is None:
            uniform = sparsities_to_zeros(allocation.uniform(layers, target), layers)
            evaluator.mode, scored = self._fitness_correction(ctx, evaluator, uniform)
            magnitude = allocation.global_magnitude(ctx.student, layers, target)
            s = fit_to_target(np.array([magnitude[l.name] for l in layers]), numels, target, caps)
            candidates: dict[str, np.ndarray] = {
                "uniform": uniform,
                "global-magnitude": integer_zeros(s, numels, target, caps),
            }
            for name, zeros in candidates.items():
                # the uniform allocation was scored under the chosen mode already
                agreement = scored[evaluator.mode] if name == "uniform" else evaluator(zeros)
                fitness[name] = {"fitness": agreement.score, **agreement.as_dict()}
        else:  # N:M: the pattern fixes every layer's sparsity; no allocation to search
            candidates = {"pattern": np.array([int((~pattern_masks[l.name]).sum()) for l in layers])}
            evaluator.mode, scored = self._fitness_correction(ctx, evaluator, None, pattern_masks)
            agreement = scored[evaluator.mode]
            fitness = {"pattern": {"fitness": agreement.score, **agreement.as_dict()}}
        search_info: dict = {"ran": False}
        plan = self._plan_for(evaluator.mode)
        if nm is None and cfg.search and len(layers) > 1:
            found, search_info = self._search(ctx, cfg, evaluator, numels, caps, started, plan)
            if found is not None:
                candidates["search"] = found.zeros
                fitness["search"] = {"fitness": found.fitness, **found.details}
        chosen = max(fitness, key=lambda k: (fitness[k]["fitness"], k == "search"))
        zeros = candidates[chosen]
        if nm is not None:
            search_info.update({"pattern": ctx.config.pattern,
                                "dense_layers": patterns.dense_layers(layers, ctx.config.pattern)})
        search_info.update({
            "plan": plan.as_dict(),
            "fitness_samples": evaluator.n_samples,
            "fitness_measure": "negative mean distance to the dense model per output (KL for class/sequence "
                               "logits, Bernoulli KL for binary logits, normalised MSE for dense outputs)",
            "correction_mode": evaluator.mode,
            "seconds_per_candidate": round(evaluator.seconds_per_candidate, 4),
            "seconds_per_candidate_by_mode": {mode: round(seconds / count, 4)
                                              for mode, (count, seconds) in evaluator.timings.items()},
            "layer_caps": {layer.name: cap for layer, cap in zip(layers, caps) if cap < cfg.max_layer_sparsity},
            "protected_layers": protected,
            "candidates": fitness,
            "chosen": chosen,
        })
        if ctx.run_dir is not None:
            ctx.run_dir.save("allocation", {"zeros": torch.as_tensor(zeros), "info": to_plain(search_info)})
        return zeros, pattern_masks, search_info, False

    @staticmethod
    def _fitness_correction(ctx: PruneContext, evaluator: FitnessEvaluator, zeros,
                            masks=None) -> tuple[str, dict[str, Agreement]]:
        """The correction mode the fitness uses, chosen once on the uniform (or N:M) allocation, and that
        allocation's agreement under every mode scored."""
        scored = {}
        modes = correction_modes(ctx.imported.has_batchnorm, ctx.layers) if ctx.config.correction else ("none",)
        for mode in modes:
            evaluator.mode = mode
            scored[mode] = evaluator.score_masks(masks) if masks is not None else evaluator(zeros)
        best = max(modes, key=lambda mode: scored[mode].score)  # ties: the earlier, cheaper mode
        return best, scored

    @staticmethod
    def _search(ctx: PruneContext, cfg: UniPTSConfig, evaluator: FitnessEvaluator, numels, caps, started,
                plan: WorkPlan):
        rng = np.random.default_rng(np.random.SeedSequence([ctx.config.seed, 0x5EA2C4]))
        search = EvolutionarySearch(
            evaluator, numels, target=float(ctx.config.sparsity), regrow=cfg.regrow, s_max=caps,
            population=cfg.population, parents=cfg.parents, crossover=cfg.crossover,
            mutation=cfg.mutation, mutation_prob=cfg.mutation_prob, rng=rng, dist=ctx.dist,
        )
        generations = plan.generations
        if generations < 1:  # not one generation fits the search's share of the work budget: no search
            reason = f"{plan.reason}; the uniform and global-magnitude allocations compete alone"
            _announce(ctx, f"UniPTS search skipped: {reason}")
            return None, {"ran": False, "skipped": reason}
        search_budget = None
        if cfg.time_budget is not None:
            search_budget = max(plan_module.SEARCH_SHARE * cfg.time_budget - (time.perf_counter() - started), 0.0)
        with _progress(ctx, generations, "unipts search") as bar:
            found = search.run(generations, progress=bar, budget_s=search_budget)
        if found.generations < generations:
            _announce(ctx, f"UniPTS search cut by --time-budget after {found.generations} of {generations} "
                           "generations: this run depends on the machine's speed and is not reproducible")
        return found, {
            "ran": True, "generations": found.generations, "planned_generations": generations,
            "cut_by_time_budget": found.generations < generations,
            "population": cfg.population, "parents": cfg.parents, "crossover": cfg.crossover,
            "mutation": cfg.mutation, "mutation_prob": cfg.mutation_prob, "regrow": cfg.regrow,
            "max_layer_sparsity": cfg.max_layer_sparsity, "evaluations": found.evaluations,
            "genome": found.genome.tolist(), "history": found.history,
        }

    @staticmethod
    def _start(ctx: PruneContext, evaluator: FitnessEvaluator, zeros, pattern_masks):
        """Score the starting points on the selection and leave the student at the best one: the magnitude-pruned
        model after its best statistics correction (pruned weights then get their dense values back, for
        dynamic sparse training), and the layer-wise reconstruction of the chosen allocation and, where that
        differs, of the uniform one (the fitness scores allocations by magnitude pruning, which is not what
        suits reconstruction best). Returns the report, the chosen start with its masks applied (for the final
        comparison), its allocation (zeros per layer) and masks."""

        layers = ctx.layers
        selection = ctx.selection_scorer()
        masks = evaluator.prune(zeros) if pattern_masks is None else evaluator.apply_masks(pattern_masks)
        choice = ctx.correct()
        scores = {"magnitude+correction": selection(ctx.student)}
        states = {"magnitude+correction": copy_state(ctx.student)}
        starts = {"magnitude+correction": (zeros, masks)}
        allocations = {"reconstruct": zeros}
        if pattern_masks is None:
            uniform = sparsities_to_zeros(allocation.uniform(layers, float(ctx.config.sparsity)), layers)
            if not np.array_equal(uniform, zeros):
                allocations["reconstruct, uniform allocation"] = uniform
        fitted = {}
        for name, alloc in allocations.items():
            evaluator.restore()
            with torch.no_grad():
                rec_masks, rows, _ = reconstruct_all(ctx, zeros_to_sparsities(alloc, layers), pattern_masks)
            scores[name], states[name], starts[name] = selection(ctx.student), copy_state(ctx.student), (alloc, rec_masks)
            fitted[name] = sum(1 for r in rows if r.get("fitted"))
        chosen = max(scores, key=lambda k: (scores[k].score, k != "magnitude+correction"))
        load_state(ctx.student, states[chosen])
        zeros, masks = starts[chosen]
        if chosen == "magnitude+correction":
            evaluator.restore_pruned(masks)  # pruned weights get their dense values back
        report = {"chosen": chosen, "measured_on": selection.split,
                  "candidates": {k: v.as_dict() for k, v in scores.items()},
                  "correction": choice.as_dict(), "reconstructed_layers": fitted}
        _announce(ctx, f"UniPTS start: {chosen} (selection " + ", ".join(
            f"{k} {v.score:.4g}" for k, v in scores.items()) + ")")
        return report, states[chosen], zeros, masks

    def _train(self, ctx: PruneContext, cfg: UniPTSConfig, signals, masks, sparsities, autocast, started, resumed,
               mode: str):
        for layer in ctx.layers:  # one mask function per layer: magnitude at s_l, or the layer's N:M groups
            attach_masks(ctx.student, [layer], masks, sparsities, dynamic=True, decay=cfg.pruned_decay,
                         mask_fn=patterns.mask_fn_for(layer, ctx.config.pattern))
        selection = ctx.selection_scorer()
        plan = self._train_plan(ctx, cfg, started, self._plan_for(mode))
        gamma = cfg.gamma if cfg.gamma is not None else default_gamma(max(plan.epochs, 1e-6))
        loss_fn = Distillation(signals, tau0=cfg.tau0, gamma=gamma, temperature=cfg.temperature,
                               feature_weight=cfg.feature_weight,
                               feature_paths=[layer.module_path for layer in ctx.layers])
        train_bs = min(cfg.batch_size, ctx.calib.n_train)
        augment = bool(cfg.augment and ctx.calib.augment)
        flip, flip_measured = self._flip(ctx, signals) if augment else (False, None)
        epoch_batches = training_batches(ctx, train_bs, augment, flip)

        before = selection(ctx.student)
        resume = ctx.run_dir.load("training") if ctx.run_dir is not None else None
        checkpoint = (lambda state: ctx.run_dir.save("training", state)) if ctx.run_dir is not None else None
        with _progress(ctx, plan.iterations, "unipts train") as bar:
            trained = train(ctx.student, ctx.teacher, epoch_batches, loss_fn, plan, selection=selection,
                            autocast=autocast, progress=bar, resume=resume,
                            checkpoint=checkpoint, checkpoint_every=ctx.config.checkpoint_every,
                            freeze_batchnorm=cfg.batchnorm == "frozen", max_grad_norm=cfg.max_grad_norm,
                            dist=ctx.dist)
        fake_quant = train_last_part(ctx, plan, epoch_batches, loss_fn, selection=selection, autocast=autocast,
                                     freeze_batchnorm=cfg.batchnorm == "frozen", max_grad_norm=cfg.max_grad_norm,
                                     trained_iterations=trained.iterations)  # --quantize: the int8 candidate
        self._alternatives = fake_quant.alternatives
        report = {
            "loss": loss_fn.name, "logits": signals.logits, "tau0": cfg.tau0, "gamma": loss_fn.gamma,
            "temperature": cfg.temperature, "feature_weight": cfg.feature_weight,
            "feature_layers": len(loss_fn.feature_paths), "pruned_decay": cfg.pruned_decay, "lr": plan.lr,
            "momentum": plan.momentum, "weight_decay": plan.weight_decay, "batch_size": train_bs,
            "warmup_iterations": plan.warmup, "iterations_per_epoch": plan.iterations_per_epoch,
            "augment": augment, "flip": flip, "flip_agreement": flip_measured, "batchnorm": cfg.batchnorm,
            "max_grad_norm": cfg.max_grad_norm, "selection_before": before.as_dict(), **trained.as_dict(),
        }
        if fake_quant.report is not None:
            report["fake_quant"] = fake_quant.report
        return report, {"allocation": resumed, "training_step": int(resume["step"]) if resume is not None else None}

    @staticmethod
    def _flip(ctx: PruneContext, signals) -> tuple[bool, float]:
        """Whether the augmentation flips: only when the teacher's outputs survive a mirrored input."""
        batches = FixedBatches(ctx, "train", min(FLIP_SAMPLES, ctx.calib.n_train), ctx.config.batch_size)()
        measured = flip_agreement(ctx.teacher, signals, batches, ctx.calib.layouts[ctx.calib.input_names[0]])
        flip = bool(ctx.dist.broadcast_object(measured >= FLIP_AGREEMENT))
        if not flip:
            _announce(ctx, f"UniPTS augmentation without flips: the dense model agrees with itself on "
                           f"{measured:.0%} of mirrored calibration samples (flips need {FLIP_AGREEMENT:.0%})")
        return flip, measured

    @staticmethod
    def _train_plan(ctx: PruneContext, cfg: UniPTSConfig, started: float, work: WorkPlan) -> TrainPlan:
        """The work plan's iterations, or the ``--epochs``/``--iterations`` given; ``--time-budget`` caps them."""
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

    @staticmethod
    def _finish(ctx: PruneContext, start_state: dict[str, torch.Tensor], start_report: dict) -> tuple[dict, str]:
        """Statistics correction of the trained model chosen on the selection, then the trained model against the
        starting point: the trained one is kept only if the selection resolves it as closer to the dense model
        (:meth:`PairedComparison.better`: a selection of a few dozen samples cannot tell a small gain from noise,
        and the start, a deterministic fit, is the safer of two indistinguishable models)."""
        selection = ctx.selection_scorer()
        choice = ctx.correct()
        trained = selection(ctx.student)
        start = start_report["candidates"][start_report["chosen"]]
        decision: dict = {"rule": f"trained kept if closer on average by more than {KEEP_TRAINED_Z} standard "
                                  f"errors or by more than {KEEP_TRAINED_MARGIN:.0%} of the start's distance, "
                                  f"unless farther on more samples than closer by more than {KEEP_TRAINED_Z} "
                                  "standard deviations of a sign test"}
        kept = "trained"
        if start_state is not None:
            trained_state = copy_state(ctx.student)
            load_state(ctx.student, start_state)
            paired = paired_improvement(trained, selection(ctx.student))
            decision.update(paired.as_dict())
            if paired.better(KEEP_TRAINED_Z, KEEP_TRAINED_MARGIN) and math.isfinite(trained.score):
                load_state(ctx.student, trained_state)
            else:
                kept = "start"
                _announce(ctx, f"UniPTS: the selection does not resolve the trained model as closer to the dense one "
                               f"than its start (mean per-sample gain {paired.gain:.4g} = "
                               f"{paired.relative_gain:.1%}, standard error {paired.standard_error:.3g}; closer on "
                               f"{paired.closer}, farther on {paired.farther} samples); the start "
                               f"({start_report['chosen']}) is kept")
        return {**choice.as_dict(), "trained": trained.as_dict(), "start": start, "kept_by": decision}, kept

    @staticmethod
    def _check_finite(ctx: PruneContext) -> None:
        bad = [n for n, p in ctx.student.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()]
        if bad:
            raise OnnxSparseError(f"UniPTS produced non-finite weights ({', '.join(bad[:3])}); nothing was written")
        agreement = ctx.selection_scorer()(ctx.student)
        if not math.isfinite(agreement.score):
            raise OnnxSparseError("UniPTS produced non-finite outputs on the selection samples; nothing was written")
