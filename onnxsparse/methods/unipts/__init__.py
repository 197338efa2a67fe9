"""UniPTS (Xie et al., CVPR 2024): reducing-regrowing allocation search, base-decayed distillation and
dynamic sparse training, label-free, on any imported model.

Phases (``MethodResult.info`` reports each):

1. allocation: the evolutionary search over reduce-regrow genomes (:mod:`.search`), scored by agreement with
   the dense teacher after statistics correction; the uniform and global-magnitude allocations are scored
   the same way and the fittest of the three is kept;
2. training: dynamic sparse training with the base-decayed KL (class logits) or a normalised MSE (other
   outputs) (:mod:`.dst`, :mod:`.objective`), starting from the corrected pruned model;
3. finish: masks baked (exactly the allotted zeros per layer), then a final statistics correction that is
   kept only if it raises agreement with the teacher on the calibration holdout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time

import numpy as np
import torch
from tqdm import tqdm

from onnxsparse.config import UniPTSConfig
from onnxsparse.device import oom_phase
from onnxsparse.errors import OnnxSparseError
from onnxsparse.methods.base import MethodResult, PruneContext, register_method
from onnxsparse.methods.unipts.dst import HoldoutScorer, TrainPlan, train, training_batches
from onnxsparse.methods.unipts.objective import Distillation, as_outputs, default_gamma, is_class_logits
from onnxsparse.methods.unipts.search import (
    EvolutionarySearch,
    FitnessEvaluator,
    sparsities_to_zeros,
    zeros_to_sparsities,
)
from onnxsparse.sparsity import allocation, patterns
from onnxsparse.sparsity.correction import correct as correct_statistics
from onnxsparse.sparsity.masks import attach_masks, bake_masks, current_masks

logger = logging.getLogger(__name__)

DEFAULT_LR = 0.05  # with the default T = 1 (config.UniPTSConfig.lr)
# DST starts from the corrected pruned model with the pruned weights holding their dense values again
# (measured on the sample against "corrected" (pruned weights zero) and "dense" (no correction): best holdout KL)
INIT = "corrected+dense"
SEARCH_SHARE = 0.3  # of --time-budget, when the search runs
_CACHE_BYTES = 1 << 30  # fitness / holdout inputs kept on the device up to this size


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA devices that support it, nothing elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def _take(batches, n: int) -> list[tuple[torch.Tensor, ...]]:
    out, seen = [], 0
    for batch in batches:
        if seen >= n:
            break
        take = min(n - seen, batch[0].shape[0])
        out.append(tuple(t[:take] for t in batch))
        seen += take
    return out


class _Batches:
    """A fixed, unaugmented list of batches: kept on the device when small, else re-read each time."""

    def __init__(self, ctx: PruneContext, split: str, n: int, batch_size: int):
        self.ctx, self.split, self.n, self.batch_size = ctx, split, n, batch_size
        arrays = ctx.calib.train if split == "train" else ctx.calib.holdout
        nbytes = sum(a[:n].nbytes for a in arrays.values())
        self.cached = _take(self._read(), n) if nbytes <= _CACHE_BYTES else None

    def _read(self):
        return self.ctx.calib.batches(self.split, self.batch_size, shuffle=False, seed=0, device=self.ctx.device)

    def __call__(self):
        return self.cached if self.cached is not None else _take(self._read(), self.n)


class _Phases:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            with oom_phase(name):
                yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)


def _progress(ctx: PruneContext, total: int, desc: str):
    return tqdm(total=total, desc=desc, unit="it" if "train" in desc else "gen", disable=not ctx.progress,
                leave=False, dynamic_ncols=True)


def _plain(obj):
    """Plain Python data (what a weights_only checkpoint may hold) from numpy-laden report data."""
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


@register_method("unipts")
class UniPTS:
    name = "unipts"

    def run(self, ctx: PruneContext) -> MethodResult:
        cfg: UniPTSConfig = ctx.config.unipts
        nm = ctx.config.nm
        started = time.perf_counter()
        phases = _Phases()
        layers = ctx.layers
        numels = [layer.numel for layer in layers]
        target = float(ctx.config.sparsity)
        autocast = autocast_for(ctx.device)
        n_train = ctx.calib.n_train
        if n_train < 2:
            raise OnnxSparseError(f"UniPTS needs at least 2 calibration training samples, got {n_train}")
        eval_bs = ctx.config.batch_size
        info: dict = {"device": str(ctx.device), "autocast": "bf16" if autocast is not contextlib.nullcontext else None,
                      "threads": torch.get_num_threads() if ctx.device.type == "cpu" else None}

        # ---------------------------------------------------------------- allocation
        with phases("allocation"):
            fitness_batches = _Batches(ctx, "train", min(cfg.fitness_samples, n_train), eval_bs)
            batches = fitness_batches()
            with torch.no_grad(), autocast():
                logits = is_class_logits([o for o in as_outputs(ctx.teacher(*batches[0]))])
            correction = ctx.config.correction
            evaluator = FitnessEvaluator(
                ctx.student, ctx.teacher, layers, batches, logits=logits, correction=correction,
                has_batchnorm=ctx.imported.has_batchnorm,
                channel_inputs=ctx.correction_inputs() if correction else None, autocast=contextlib.nullcontext,
            )  # fitness in fp32: bf16 would blur the ranking of close candidates
            saved = ctx.run_dir.load("allocation") if ctx.run_dir is not None else None
            if saved is not None:  # resumed run: the allocation was searched already
                zeros = saved["zeros"].numpy()
                search_info = saved["info"]
                if nm is not None:
                    pattern_masks = patterns.pattern_masks(ctx.student, layers, ctx.config.pattern, {})
            else:
                if nm is None:
                    candidates: dict[str, np.ndarray] = {
                        "uniform": sparsities_to_zeros(allocation.uniform(layers, target), layers),
                        "global-magnitude": sparsities_to_zeros(
                            allocation.global_magnitude(ctx.student, layers, target), layers),
                    }
                    fitness: dict[str, dict] = {}
                    for name, zeros in candidates.items():
                        agreement = evaluator(zeros)
                        fitness[name] = {"fitness": agreement.score, **agreement.as_dict()}
                else:  # N:M: the pattern fixes every layer's sparsity; no allocation to search
                    pattern_masks = patterns.pattern_masks(ctx.student, layers, ctx.config.pattern, {})
                    candidates = {"pattern": np.array([int((~pattern_masks[l.name]).sum()) for l in layers])}
                    agreement = evaluator.score_masks(pattern_masks)
                    fitness = {"pattern": {"fitness": agreement.score, **agreement.as_dict()}}
                search_info: dict = {"ran": False}
                budget_left = None if cfg.time_budget is None else cfg.time_budget - (time.perf_counter() - started)
                if nm is None and cfg.search and len(layers) > 1:
                    rng = np.random.default_rng(np.random.SeedSequence([ctx.config.seed, 0x5EA2C4]))
                    search = EvolutionarySearch(
                        evaluator, numels, target=target, regrow=cfg.regrow, s_max=cfg.max_layer_sparsity,
                        population=cfg.population, parents=cfg.parents, crossover=cfg.crossover,
                        mutation=cfg.mutation, mutation_prob=cfg.mutation_prob, rng=rng, dist=ctx.dist,
                    )
                    generations = cfg.generations
                    search_budget = None
                    if budget_left is not None:
                        search_budget = max(SEARCH_SHARE * budget_left, 0.0)
                        per_gen = evaluator.seconds_per_candidate * cfg.population
                        generations = max(1, min(generations, int(search_budget / max(per_gen, 1e-9))))
                    with _progress(ctx, generations, "unipts search") as bar:
                        found = search.run(generations, progress=bar, stop=ctx.stop, budget_s=search_budget)
                    candidates["search"] = found.zeros
                    fitness["search"] = {"fitness": found.fitness, **found.details}
                    search_info = {
                        "ran": True, "generations": found.generations, "planned_generations": generations,
                        "population": cfg.population, "parents": cfg.parents, "crossover": cfg.crossover,
                        "mutation": cfg.mutation, "mutation_prob": cfg.mutation_prob, "regrow": cfg.regrow,
                        "max_layer_sparsity": cfg.max_layer_sparsity, "evaluations": found.evaluations,
                        "genome": found.genome.tolist(), "history": found.history,
                    }
                chosen = max(fitness, key=lambda k: (fitness[k]["fitness"], k == "search"))
                zeros = candidates[chosen]
            zeros = ctx.dist.broadcast_object(zeros)  # rank 0's choice, should float noise split the ranks
            sparsities = zeros_to_sparsities(zeros, layers)
            if saved is None:
                if nm is not None:
                    search_info.update({"pattern": ctx.config.pattern,
                                        "dense_layers": patterns.dense_layers(layers, ctx.config.pattern)})
                search_info.update({
                    "fitness_samples": sum(b[0].shape[0] for b in batches),
                    "fitness_measure": "negative KL(teacher || student), T=1" if logits
                    else "negative normalised MSE per output",
                    "seconds_per_candidate": round(evaluator.seconds_per_candidate, 4),
                    "candidates": fitness,
                    "chosen": chosen,
                })
            info["allocation"] = search_info
            if ctx.run_dir is not None and saved is None:
                ctx.run_dir.save("allocation", {"zeros": torch.as_tensor(zeros), "info": _plain(search_info)})

        # ---------------------------------------------------------------- training
        with phases("training"):
            # dense snapshot restored, chosen allocation applied
            masks = evaluator.prune(zeros) if nm is None else evaluator.apply_masks(pattern_masks)
            init_report = None
            if INIT == "dense":
                evaluator.restore()
            else:
                init_report = evaluator.correct()
                if INIT == "corrected+dense":
                    evaluator.restore_pruned(masks)  # pruned weights get their dense values back
            del evaluator
            for layer in layers:  # one mask function per layer: magnitude at s_l, or the layer's N:M groups
                attach_masks(ctx.student, [layer], masks, sparsities, dynamic=True, decay=cfg.pruned_decay,
                             mask_fn=patterns.mask_fn_for(layer, ctx.config.pattern))
            holdout = self._holdout(ctx, autocast, logits, fitness_batches, eval_bs)
            plan = self._plan(ctx, cfg, started)
            gamma = cfg.gamma if cfg.gamma is not None else default_gamma(max(plan.epochs, 1e-6))
            loss_fn = Distillation(logits, tau0=cfg.tau0, gamma=gamma, temperature=cfg.temperature)
            train_bs = min(cfg.batch_size, n_train)
            augment = bool(cfg.augment and ctx.calib.augment)

            epoch_batches = training_batches(ctx, train_bs, augment)

            before = holdout(ctx.student) if holdout is not None else None
            resume = ctx.run_dir.load("training") if ctx.run_dir is not None else None
            checkpoint = (lambda state: ctx.run_dir.save("training", state)) if ctx.run_dir is not None else None
            with _progress(ctx, plan.iterations, "unipts train") as bar:
                trained = train(ctx.student, ctx.teacher, epoch_batches, loss_fn, plan, holdout=holdout,
                                autocast=autocast, progress=bar, stop=ctx.stop, resume=resume,
                                checkpoint=checkpoint, checkpoint_every=ctx.config.checkpoint_every, dist=ctx.dist)
            info["resumed"] = {"allocation": saved is not None,
                               "training_step": int(resume["step"]) if resume is not None else None}
            info["training"] = {
                "loss": loss_fn.name, "logits": logits, "tau0": cfg.tau0, "gamma": gamma,
                "temperature": cfg.temperature, "pruned_decay": cfg.pruned_decay, "lr": plan.lr,
                "momentum": plan.momentum, "weight_decay": plan.weight_decay, "batch_size": train_bs,
                "warmup_iterations": plan.warmup, "iterations_per_epoch": plan.iterations_per_epoch,
                "augment": augment, "init": INIT, "initial_correction": init_report.as_dict() if init_report else None,
                "holdout_before": before.as_dict() if before is not None else None,
                **trained.as_dict(),
            }

        # ---------------------------------------------------------------- finish
        with phases("finish"):
            final_masks = current_masks(ctx.student, layers)
            for layer in layers:
                got = int((~final_masks[layer.name]).sum())
                if got != int(zeros[layers.index(layer)]):
                    raise OnnxSparseError(f"internal error: layer {layer.name!r} mask has {got} zeros")
            bake_masks(ctx.student, layers)
            info["final_correction"] = self._final_correction(ctx, holdout, fitness_batches, autocast)
            self._check_finite(ctx, holdout)
        info["sparsities"] = sparsities
        info["time_s"] = {**phases.seconds, "total": round(time.perf_counter() - started, 3)}
        return MethodResult(sparsities, final_masks, info)

    # ------------------------------------------------------------------------------------------------
    @staticmethod
    def _holdout(ctx, autocast, logits, fitness_batches, eval_bs):
        if ctx.calib.n_holdout > 0:
            source = _Batches(ctx, "holdout", ctx.calib.n_holdout, eval_bs)
            split = "holdout"
        else:
            source = fitness_batches
            split = "train (no holdout split)"
        scorer = HoldoutScorer(ctx.teacher, source, logits=logits, autocast=contextlib.nullcontext)  # fp32
        scorer.split = split
        return scorer

    @staticmethod
    def _plan(ctx: PruneContext, cfg: UniPTSConfig, started: float) -> TrainPlan:
        train_bs = min(cfg.batch_size, ctx.calib.n_train)
        per_epoch = max(ctx.calib.n_train // train_bs, 1)
        iterations = cfg.iterations if cfg.iterations is not None else int(round(cfg.epochs * per_epoch))
        warmup = min(int(round(cfg.warmup_epochs * per_epoch)), iterations // 4)
        budget = None
        if cfg.time_budget is not None:
            budget = max(cfg.time_budget - (time.perf_counter() - started), 0.0)
        return TrainPlan(iterations=iterations, iterations_per_epoch=per_epoch, warmup=warmup,
                         lr=cfg.lr if cfg.lr is not None else DEFAULT_LR, momentum=cfg.momentum,
                         weight_decay=cfg.weight_decay, budget_s=budget)

    @staticmethod
    def _final_correction(ctx: PruneContext, holdout: HoldoutScorer, fitness_batches, autocast) -> dict:
        """Statistics correction of the trained model, kept only if holdout agreement improves."""
        if not ctx.config.correction:
            return {"applied": False, "reason": "--no-correction"}
        before = holdout(ctx.student)
        saved = {k: v.detach().clone() for k, v in ctx.student.state_dict().items()}
        with torch.no_grad(), autocast():
            report = correct_statistics(
                ctx.student, ctx.teacher, ctx.layers,
                bn_batches=fitness_batches() if ctx.imported.has_batchnorm else None,
                channel_inputs=ctx.correction_inputs(),
            )
        after = holdout(ctx.student)
        keep = after.score > before.score
        if not keep:
            with torch.no_grad():
                for k, v in ctx.student.state_dict().items():
                    v.copy_(saved[k])
        return {"applied": keep, "measured_on": holdout.split, "before": before.as_dict(),
                "after": after.as_dict(), "correction": report.as_dict()}

    @staticmethod
    def _check_finite(ctx: PruneContext, holdout: HoldoutScorer) -> None:
        bad = [n for n, p in ctx.student.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()]
        if bad:
            raise OnnxSparseError(f"UniPTS produced non-finite weights ({', '.join(bad[:3])}); nothing was written")
        agreement = holdout(ctx.student)
        if not math.isfinite(agreement.score):
            raise OnnxSparseError("UniPTS produced non-finite outputs on the holdout samples; nothing was written")
