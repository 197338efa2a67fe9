"""UniPTS's orchestration: allocation, start, training, finish (the package docstring describes each phase).

Each phase hands the next explicit values: the allocation (zeros per layer and, under N:M, the pattern's masks),
the start :class:`.Candidate` (scored, with its masks) and the one training starts from, the trained candidate;
the keep rule compares candidates. The student module is set to a candidate only by :func:`.materialise`.
"""

from __future__ import annotations

import contextlib
import functools
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
from onnxsparse.methods.reconstruct import reconstruct_all
from onnxsparse.methods.scoring import FixedBatches
from onnxsparse.methods.unipts.candidate import Candidate, materialise, regrown
from onnxsparse.methods.unipts.dst import train
from onnxsparse.methods.unipts.evaluator import FitnessEvaluator
from onnxsparse.methods.unipts.fakequant import train_last_part
from onnxsparse.methods.unipts.feed import training_batches
from onnxsparse.methods.unipts.flip import FLIP_AGREEMENT, decide_flip
from onnxsparse.methods.unipts.keep import RULE, keep
from onnxsparse.methods.unipts.objective import Distillation, default_gamma
from onnxsparse.methods.unipts.plan import WorkPlan, plan_work, search_budget_s, train_plan, work_per_sample
from onnxsparse.methods.unipts.search import (
    EvolutionarySearch,
    fit_to_target,
    integer_zeros,
    sparsities_to_zeros,
    zeros_to_sparsities,
)
from onnxsparse.metrics import Agreement
from onnxsparse.plain import to_plain
from onnxsparse.sparsity import allocation, patterns
from onnxsparse.sparsity.correction import correction_modes
from onnxsparse.sparsity.masks import attach_masks, bake_masks, current_masks
from onnxsparse.timing import Phases

logger = logging.getLogger(__name__)

MAGNITUDE_START = "magnitude+correction"


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
        # correction mode of the fitness -> the work plan (search generations, training iterations)
        work = functools.partial(
            plan_work, macs, activations, n_train=ctx.calib.n_train, batch_size=ctx.config.batch_size,
            fitness_samples=min(cfg.fitness_samples, ctx.calib.n_train), population=cfg.population,
            generations=cfg.generations, search=cfg.search and ctx.config.nm is None and len(layers) > 1,
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
                ctx.student, ctx.teacher, layers, fitness_batches(), signals=signals,
                has_batchnorm=ctx.imported.has_batchnorm,
                channel_inputs=ctx.correction_inputs() if ctx.config.correction else None,
                autocast=contextlib.nullcontext,
            )  # fitness in fp32: bf16 would blur the ranking of close candidates
            zeros, pattern_masks, info["allocation"], resumed = _allocate(ctx, cfg, evaluator, started, work)
            zeros = ctx.dist.broadcast_object(zeros)  # rank 0's choice, should float noise split the ranks

        with phases("start"):
            info["start"], start, training_start = _start(ctx, evaluator, zeros, pattern_masks)
            del evaluator
        sparsities = zeros_to_sparsities(start.zeros, layers)

        with phases("training"):
            materialise(training_start, ctx.student)
            plan = work(mode=info["allocation"]["correction_mode"])
            info["training"], info["resumed"], alternatives = _train(ctx, cfg, signals, training_start, sparsities,
                                                                     autocast, started, resumed, plan)

        with phases("finish"):
            final_masks = current_masks(ctx.student, layers)
            for i, layer in enumerate(layers):
                got = int((~final_masks[layer.name]).sum())
                if got != int(start.zeros[i]):
                    raise OnnxSparseError(f"internal error: layer {layer.name!r} mask has {got} zeros")
            bake_masks(ctx.student, layers)
            info["final_correction"], kept = _finish(ctx, start, final_masks, info["start"])
            materialise(kept, ctx.student)
            info["kept"] = "start" if kept is start else "trained"
            if kept is start:
                final_masks = {layer.name: layer.weight.get(ctx.student).detach() != 0 for layer in layers}
            _check_finite(ctx)
        info["sparsities"] = sparsities
        info["time_s"] = {**phases.rounded(), "total": round(time.perf_counter() - started, 3)}
        return MethodResult(sparsities, final_masks, info, alternatives=alternatives)


# ------------------------------------------------------------------------------------------------------------
# allocation
# ------------------------------------------------------------------------------------------------------------
def _allocate(ctx: PruneContext, cfg: UniPTSConfig, evaluator: FitnessEvaluator, started: float, work):
    """(zeros per layer, N:M masks or None, report, resumed) — the search, or what a run directory kept. The
    report's ``correction_mode`` is the mode the fitness used."""
    layers = ctx.layers
    nm = ctx.config.nm
    pattern_masks = None
    if nm is not None:
        pattern_masks = patterns.pattern_masks(ctx.student, layers, ctx.config.pattern, {})
    saved = ctx.run_dir.load("allocation") if ctx.run_dir is not None else None
    if saved is not None:  # resumed run: the allocation was searched already
        return saved["zeros"].numpy(), pattern_masks, saved["info"], True
    target = float(ctx.config.sparsity)
    numels = [layer.numel for layer in layers]
    caps, protected = allocation.layer_caps(ctx.imported.proto, layers, target, cfg.max_layer_sparsity)
    fitness: dict[str, dict] = {}
    if nm is None:
        uniform = sparsities_to_zeros(allocation.uniform(layers, target), layers)
        mode, scored = _fitness_correction(ctx, evaluator, uniform)
        magnitude = allocation.global_magnitude(ctx.student, layers, target)
        s = fit_to_target(np.array([magnitude[l.name] for l in layers]), numels, target, caps)
        candidates: dict[str, np.ndarray] = {
            "uniform": uniform,
            "global-magnitude": integer_zeros(s, numels, target, caps),
        }
        for name, zeros in candidates.items():
            # the uniform allocation was scored under the chosen mode already
            agreement = scored[mode] if name == "uniform" else evaluator(zeros, mode)
            fitness[name] = {"fitness": agreement.score, **agreement.as_dict()}
    else:  # N:M: the pattern fixes every layer's sparsity; no allocation to search
        candidates = {"pattern": np.array([int((~pattern_masks[l.name]).sum()) for l in layers])}
        mode, scored = _fitness_correction(ctx, evaluator, None, pattern_masks)
        agreement = scored[mode]
        fitness = {"pattern": {"fitness": agreement.score, **agreement.as_dict()}}
    search_info: dict = {"ran": False}
    plan = work(mode=mode)
    if nm is None and cfg.search and len(layers) > 1:
        found, search_info = _search(ctx, cfg, functools.partial(evaluator, mode=mode), numels, caps, started, plan)
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
        "correction_mode": mode,
        "seconds_per_candidate": round(evaluator.seconds_per_candidate(mode), 4),
        "seconds_per_candidate_by_mode": {m: round(seconds / count, 4)
                                          for m, (count, seconds) in evaluator.timings.items()},
        "layer_caps": {layer.name: cap for layer, cap in zip(layers, caps) if cap < cfg.max_layer_sparsity},
        "protected_layers": protected,
        "candidates": fitness,
        "chosen": chosen,
    })
    if ctx.run_dir is not None:
        ctx.run_dir.save("allocation", {"zeros": torch.as_tensor(zeros), "info": to_plain(search_info)})
    return zeros, pattern_masks, search_info, False


def _fitness_correction(ctx: PruneContext, evaluator: FitnessEvaluator, zeros,
                        masks=None) -> tuple[str, dict[str, Agreement]]:
    """The correction mode the fitness uses, chosen once on the uniform (or N:M) allocation, and that
    allocation's agreement under every mode scored."""
    scored = {}
    modes = correction_modes(ctx.imported.has_batchnorm, ctx.layers) if ctx.config.correction else ("none",)
    for mode in modes:
        scored[mode] = evaluator.score_masks(masks, mode) if masks is not None else evaluator(zeros, mode)
    best = max(modes, key=lambda mode: scored[mode].score)  # ties: the earlier, cheaper mode
    return best, scored


def _search(ctx: PruneContext, cfg: UniPTSConfig, evaluate, numels, caps, started: float, plan: WorkPlan):
    """The evolutionary search over reduce-regrow genomes, ``evaluate`` scoring an allocation: (its best or None
    where not one generation fits the plan, its report)."""
    rng = np.random.default_rng(np.random.SeedSequence([ctx.config.seed, 0x5EA2C4]))
    search = EvolutionarySearch(
        evaluate, numels, target=float(ctx.config.sparsity), regrow=cfg.regrow, s_max=caps,
        population=cfg.population, parents=cfg.parents, crossover=cfg.crossover,
        mutation=cfg.mutation, mutation_prob=cfg.mutation_prob, rng=rng, dist=ctx.dist,
    )
    generations = plan.generations
    if generations < 1:  # not one generation fits the search's share of the work budget: no search
        reason = f"{plan.reason}; the uniform and global-magnitude allocations compete alone"
        _announce(ctx, f"UniPTS search skipped: {reason}")
        return None, {"ran": False, "skipped": reason}
    with _progress(ctx, generations, "unipts search") as bar:
        found = search.run(generations, progress=bar, budget_s=search_budget_s(cfg, started))
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


# ------------------------------------------------------------------------------------------------------------
# start
# ------------------------------------------------------------------------------------------------------------
def _start(ctx: PruneContext, evaluator: FitnessEvaluator, zeros, pattern_masks) -> tuple[dict, Candidate, Candidate]:
    """The starting points, each a candidate scored on the selection: the magnitude-pruned model after its best
    statistics correction, and the layer-wise reconstruction of the chosen allocation and, where that differs, of
    the uniform one (the fitness scores allocations by magnitude pruning, which is not what suits reconstruction
    best). Returns the report, the best start (what the keep rule compares the trained model with) and the
    candidate training starts from: the best start, whose pruned weights get their dense values back where it
    is the magnitude-pruned one (for dynamic sparse training)."""
    layers = ctx.layers
    selection = ctx.selection_scorer()
    masks = evaluator.prune(zeros) if pattern_masks is None else evaluator.apply_masks(pattern_masks)
    choice = ctx.correct()
    starts = [Candidate.capture(ctx.student, MAGNITUDE_START, zeros=zeros, masks=masks,
                                score=selection(ctx.student), correction=choice.as_dict())]
    allocations = {"reconstruct": zeros}
    if pattern_masks is None:
        uniform = sparsities_to_zeros(allocation.uniform(layers, float(ctx.config.sparsity)), layers)
        if not np.array_equal(uniform, zeros):
            allocations["reconstruct, uniform allocation"] = uniform
    fitted = {}
    for name, alloc in allocations.items():
        materialise(evaluator.dense, ctx.student)
        with torch.no_grad():
            rec_masks, rows, _ = reconstruct_all(ctx, zeros_to_sparsities(alloc, layers), pattern_masks)
        starts.append(Candidate.capture(ctx.student, name, zeros=alloc, masks=rec_masks,
                                        score=selection(ctx.student)))
        fitted[name] = sum(1 for r in rows if r.get("fitted"))
    chosen = max(starts, key=lambda c: (c.score.score, c.name != MAGNITUDE_START))
    training_start = regrown(chosen, evaluator.dense, layers) if chosen.name == MAGNITUDE_START else chosen
    report = {"chosen": chosen.name, "measured_on": selection.split,
              "candidates": {c.name: c.score.as_dict() for c in starts},
              "correction": choice.as_dict(), "reconstructed_layers": fitted}
    _announce(ctx, f"UniPTS start: {chosen.name} (selection " + ", ".join(
        f"{c.name} {c.score.score:.4g}" for c in starts) + ")")
    return report, chosen, training_start


# ------------------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------------------
def _train(ctx: PruneContext, cfg: UniPTSConfig, signals, start: Candidate, sparsities, autocast, started: float,
           resumed: bool, work: WorkPlan):
    """Dynamic sparse training of the student, set to ``start``: (the report, what the run resumed, the
    alternative weight sets for the quantize stage: with ``--quantize``, the fake-quantized continuation)."""
    masks = {name: mask.clone() for name, mask in start.masks.items()}  # training moves these, not the start's
    for layer in ctx.layers:  # one mask function per layer: magnitude at s_l, or the layer's N:M groups
        attach_masks(ctx.student, [layer], masks, sparsities, dynamic=True, decay=cfg.pruned_decay,
                     mask_fn=patterns.mask_fn_for(layer, ctx.config.pattern))
    selection = ctx.selection_scorer()
    plan = train_plan(cfg, work, started)
    gamma = cfg.gamma if cfg.gamma is not None else default_gamma(max(plan.epochs, 1e-6))
    loss_fn = Distillation(signals, tau0=cfg.tau0, gamma=gamma, temperature=cfg.temperature,
                           feature_weight=cfg.feature_weight,
                           feature_paths=[layer.module_path for layer in ctx.layers])
    train_bs = min(ctx.config.batch_size, ctx.calib.n_train)
    augment = bool(cfg.augment and ctx.calib.augment)
    flip, flip_measured = False, None
    if augment:
        flip, flip_measured = decide_flip(ctx, signals)
        if not flip:
            _announce(ctx, f"UniPTS augmentation without flips: the dense model agrees with itself on "
                           f"{flip_measured:.0%} of mirrored calibration samples (flips need {FLIP_AGREEMENT:.0%})")
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
                                 trained_iterations=trained.iterations)
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
    resumed_at = {"allocation": resumed, "training_step": int(resume["step"]) if resume is not None else None}
    return report, resumed_at, fake_quant.alternatives


# ------------------------------------------------------------------------------------------------------------
# finish
# ------------------------------------------------------------------------------------------------------------
def _finish(ctx: PruneContext, start: Candidate, masks, start_report: dict) -> tuple[dict, Candidate]:
    """The trained student (masks baked) after the statistics correction chosen on the selection, as a candidate,
    against ``start``: (the report, the candidate the keep rule keeps)."""
    selection = ctx.selection_scorer()
    choice = ctx.correct()
    trained = Candidate.capture(ctx.student, "trained", zeros=start.zeros, masks=masks,
                                score=selection(ctx.student), correction=choice.as_dict())
    kept, paired = keep(trained, start)
    if kept is start:
        _announce(ctx, f"UniPTS: the selection does not resolve the trained model as closer to the dense one "
                       f"than its start (mean per-sample gain {paired.gain:.4g} = "
                       f"{paired.relative_gain:.1%}, standard error {paired.standard_error:.3g}; closer on "
                       f"{paired.closer}, farther on {paired.farther} samples); the start "
                       f"({start.name}) is kept")
    report = {**choice.as_dict(), "trained": trained.score.as_dict(),
              "start": start_report["candidates"][start_report["chosen"]],
              "kept_by": {"rule": RULE, **paired.as_dict()}}
    return report, kept


def _check_finite(ctx: PruneContext) -> None:
    bad = [n for n, p in ctx.student.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise OnnxSparseError(f"UniPTS produced non-finite weights ({', '.join(bad[:3])}); nothing was written")
    agreement = ctx.selection_scorer()(ctx.student)
    if not math.isfinite(agreement.score):
        raise OnnxSparseError("UniPTS produced non-finite outputs on the selection samples; nothing was written")
