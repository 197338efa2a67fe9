"""Per-model int8 choices, measured: activation calibration method, op types, layers kept in float for
agreement, op classes kept in float for speed.

Every choice compares candidate int8 models with the dense fp32 model on the selection feeds, by the
project's agreement measure (:func:`onnxsparse.exporter.verify.output_agreement`: top-1 agreement for class
outputs, per position for sequences, R^2 otherwise; the lowest over outputs), ties broken by the mean R^2 of
the raw outputs. Nothing here is a global switch: a model on which Entropy calibration or keeping ``Add`` in
float does better gets that, another model gets what its own data says.

Speed: the candidates are timed in onnxruntime on this machine (``latency``: batch 1, one thread); an op class
(op type, depthwise and grouped Conv apart) whose int8 form makes the model slower is kept in float, and when
the int8 model is still not faster than the float one, the float model is kept: ``--quantize`` never makes a
model slower on the machine it ran on.

Size: weights left in float (for speed, or because int8 was not applied at all) are stored as int8 and computed
in float (:mod:`onnxsparse.quantize.storage`) where the selection feeds allow it and onnxruntime folds them back
into float constants at load.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

from onnxsparse.errors import OnnxSparseError
from onnxsparse.exporter.verify import ort_session, output_agreement
from onnxsparse.inspect import weight_operand
from onnxsparse.quantize.bias_correction import apply_shifts, output_shifts
from onnxsparse.quantize.calibrate import METHODS, Calibration
from onnxsparse.quantize.compact import compact_int8
from onnxsparse.quantize.half import half_candidates, store_float16
from onnxsparse.quantize.prepare import prepare_for_int8
from onnxsparse.quantize.latency import LatencyMeter
from onnxsparse.quantize.quantize import (
    WEIGHT_OPS,
    Int8Settings,
    Int8Weight,
    check_int8_weights,
    int8_weights,
    named_copy,
    quantize_int8,
)
from onnxsparse.quantize.storage import storable_weights, storage_deltas, store_int8_weights, unfolded_at_load
from onnxsparse.signals import onnx_output_kinds

logger = logging.getLogger(__name__)

# An int8 model may agree with the dense model this much less than the sparse float model does (on the
# selection feeds) before layers are kept in float: the "within 1 point of sparse fp32".
MAX_AGREEMENT_DROP = 0.01
# A candidate must be this much faster to count as faster (timings on a shared machine move by a few %).
SPEED_MARGIN = 0.03
# Single-layer exclusions tried by the agreement fallback; beyond it, the first and last layers (the usual
# sensitive ones) are tried. Each is one quantization and one pass over the selection feeds: the PP-OCR line
# classifier (53 Conv) took 3 s per candidate on a 2-core CPU
MAX_FALLBACK_TRIALS = 12
# Weights scored one at a time when storing every float weight as int8 costs too much agreement (the largest;
# the rest stay float then). One selection pass each: the recogniser's 47 took about a minute on a 2-core CPU
MAX_STORAGE_TRIALS = 64
# Rounds of the speed search; each times every op class still int8 once (the line classifier needed 7 rounds of
# one class each before the rounds accepted every class that helped)
SPEED_ROUNDS = 3
# Interleaved timing passes per comparison; the fastest pass of each model counts.
SPEED_PASSES = 2
# Interleaved passes of the final int8-against-float comparison; int8 must win every one
FINAL_PASSES = 3

Latency = Callable[[onnx.ModelProto], float]  # milliseconds


@dataclass(frozen=True, order=True)
class Closeness:
    """How close a model's outputs are to the dense model's on the selection feeds (higher is closer)."""

    agreement: float  # the lowest per-output agreement
    r2: float  # mean R^2 of the raw outputs: the tie-breaker

    def as_dict(self) -> dict:
        return asdict(self)


class SelectionScorer:
    """Closeness to the dense fp32 model of any model with the same inputs and outputs, on fixed feeds."""

    def __init__(self, dense: onnx.ModelProto | str | Path, feeds: Sequence[dict[str, np.ndarray]],
                 kinds: list[tuple[str, int]] | None = None) -> None:
        self.feeds = list(feeds)
        self.reference = self._outputs(ort_session(dense, "cpu", exact=True))
        if kinds is None:  # as the quality gate and compare read the outputs
            graph = dense if isinstance(dense, onnx.ModelProto) else onnx.load(str(dense), load_external_data=False)
            kinds = onnx_output_kinds(graph, self.reference)
        self.kinds = kinds
        self.samples = sum(int(next(iter(f.values())).shape[0]) for f in self.feeds)

    def _outputs(self, session) -> list[np.ndarray]:
        names = [o.name for o in session.get_outputs()]
        runs = [session.run(names, feed) for feed in self.feeds]
        return [np.concatenate([np.asarray(r[i]).reshape(1, 1) if np.ndim(r[i]) == 0 else np.asarray(r[i])
                                for r in runs]) for i in range(len(names))]

    def __call__(self, model: onnx.ModelProto) -> Closeness:
        outputs = self._outputs(ort_session(model, "cpu"))
        agreements, r2s = [], []
        for i, (a, b) in enumerate(zip(self.reference, outputs)):
            kind, axis = self.kinds[i] if self.kinds is not None and i < len(self.kinds) else ("dense", -1)
            agreement, _ = output_agreement(a, b, kind, axis)
            r2, _ = output_agreement(a, b, "dense")
            if agreement is not None:
                agreements.append(agreement)
            if r2 is not None:
                r2s.append(r2)
        return Closeness(min(agreements) if agreements else 1.0, float(np.mean(r2s)) if r2s else 1.0)


def op_class(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> str:
    """The op type, with depthwise and grouped Conv apart (their int8 kernels differ in speed)."""
    if node.op_type == "Conv":
        group = next((int(onnx.helper.get_attribute_value(a)) for a in node.attribute if a.name == "group"), 1)
        if group > 1:
            weight = initializers.get(node.input[1])
            return "Conv (depthwise)" if weight is not None and len(weight.dims) > 1 and weight.dims[1] == 1 \
                else "Conv (grouped)"
    return node.op_type


_FORWARDING_OPS = ("Transpose", "Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten")


def indirect_weight_consumers(model: onnx.ModelProto) -> dict[str, str]:
    """Nodes that read a weight-like initializer (rank >= 2) other than as the weight operand of a
    Conv/ConvTranspose/Gemm/MatMul, where that initializer is a weight operand elsewhere or the node forwards it
    (a ``Transpose``, ``Cast``, ``Identity`` or reshape in front of a weight), by name, with the initializer. Kept
    float, the initializer stays as it is, and the zeros the pipeline counts are the zeros the file holds. A
    per-channel constant of an ``Add`` or ``Mul`` is not a weight: its node is quantized as usual."""
    initializers = {init.name: init for init in model.graph.initializer}
    direct = {node.name: weight_operand(node, initializers) if node.op_type in WEIGHT_OPS and len(node.input) > 1
              else None for node in model.graph.node}
    weights = {w for w in direct.values() if w is not None}
    found = {}
    for node in model.graph.node:
        for value in node.input:
            if (value != direct[node.name] and value in initializers and len(initializers[value].dims) >= 2
                    and (value in weights or node.op_type in _FORWARDING_OPS)):
                found[node.name] = value
    return found


@dataclass
class Int8Choice:
    """The model to save and why: int8 compute where ``applied`` (QDQ), and weights left in float stored as int8
    where ``stored`` (computed in float); the float model when neither."""

    model: onnx.ModelProto
    applied: bool
    settings: Int8Settings | None
    weights: dict[str, Int8Weight] = field(default_factory=dict)  # every int8 weight, either form
    report: dict = field(default_factory=dict)
    stored: tuple[str, ...] = ()  # weights stored int8 but computed in float (Cast -> Mul)


class _Search:
    def __init__(self, float_model: onnx.ModelProto, calibration: Calibration, scorer: SelectionScorer,
                 latency: Latency, workdir: Path) -> None:
        self.float_model = float_model
        self.float_path = workdir / "float.onnx"
        onnx.save_model(float_model, str(self.float_path))
        self.calibration = calibration
        self.scorer = scorer
        self.latency = latency
        self.workdir = workdir
        self.initializers = {init.name: init for init in float_model.graph.initializer}
        self.quantizations = 0
        self.shifts: dict[str, np.ndarray] = {}  # bias correction of each int8 weight, when on

    def quantize(self, settings: Int8Settings) -> onnx.ModelProto:
        """``settings`` applied to the float model, with the activation ranges calibrated on the float model; with
        bias correction on, from the float model whose int8 weights have their shifts taken out of their biases."""
        self.quantizations += 1
        out = self.workdir / "candidate.onnx"
        if not self.shifts:
            return quantize_int8(self.float_path, self.calibration, settings, out)
        nodes = {n.name for n in self.quantized_nodes(settings)}
        names = {w for node in self.float_model.graph.node
                 if node.name in nodes and node.op_type in WEIGHT_OPS and len(node.input) > 1
                 and (w := weight_operand(node, self.initializers)) in self.shifts}
        while True:
            path = self.workdir / "float-bias-corrected.onnx"
            onnx.save_model(apply_shifts(self.float_model, {n: self.shifts[n] for n in names}), str(path))
            quantized = quantize_int8(path, self.calibration, settings, out)
            # a weight onnxruntime left float keeps its bias: quantized again without its correction
            missing = names - set(int8_weights(self.float_model, quantized))
            if not missing:
                return quantized
            names -= missing

    def decide_bias_correction(self, settings: Int8Settings, uncorrected: Closeness) -> dict:
        """Turn bias correction on for every later candidate when ``settings`` quantized with it is closer to the
        dense model than without (``uncorrected``, its score); the report entry."""
        weights = int8_weights(self.float_model, self.quantize(settings))
        deltas = {name: w.dequantized() - numpy_helper.to_array(self.initializers[name])
                  for name, w in weights.items()}
        shifts, uncorrectable = output_shifts(self.float_model, deltas, self.calibration.feeds)
        entry: dict = {"applied": False, "weights": 0, "not_correctable": uncorrectable,
                       "closeness_uncorrected": uncorrected.as_dict()}
        if shifts:
            self.shifts = shifts
            corrected = self.scorer(self.quantize(settings))
            entry["closeness_corrected"] = corrected.as_dict()
            if corrected > uncorrected:
                entry.update(applied=True, weights=len(shifts))
            else:
                self.shifts = {}
        return entry

    def quantized_nodes(self, settings: Int8Settings) -> list[onnx.NodeProto]:
        """Nodes the quantizer is allowed to quantize under ``settings``."""
        ops = set(settings.op_types) if settings.op_types else set(QDQRegistry) | set(QLinearOpsRegistry)
        excluded = set(settings.exclude)
        return [n for n in self.float_model.graph.node if n.op_type in ops and n.name not in excluded]


def choose_int8(float_model: onnx.ModelProto, dense_model: onnx.ModelProto | str | Path,
                calibration_feeds: Sequence[dict[str, np.ndarray]], selection_feeds: Sequence[dict[str, np.ndarray]],
                *, kinds: list[tuple[str, int]] | None = None, latency: Latency | None = None,
                max_drop: float = MAX_AGREEMENT_DROP, speed_margin: float = SPEED_MARGIN,
                max_trials: int = MAX_FALLBACK_TRIALS) -> Int8Choice:
    """Quantize ``float_model`` (the sparse fp32 model) to int8 the way the selection feeds say is best.

    ``calibration_feeds`` calibrate the activation ranges; ``selection_feeds`` decide every choice by the
    closeness of each candidate to ``dense_model`` (outputs described by ``kinds``, as in
    :func:`onnxsparse.exporter.verify.compare_sessions`); ``latency`` times a model in milliseconds (default:
    :class:`LatencyMeter` on the first selection sample).
    """
    selection_feeds = list(selection_feeds)
    meter = latency or LatencyMeter(selection_feeds[0])
    original = named_copy(float_model)
    # every candidate is made from the model with Constant-node tensors as initializers and BatchNormalization
    # folded into its Conv (weight names kept); the float model is returned as it was when no int8 form is kept
    model, prepared = prepare_for_int8(original, selection_feeds[0])
    model = named_copy(model)  # the opset converter adds nodes without names; nodes are kept float by name
    with tempfile.TemporaryDirectory(prefix="onnxsparse-int8-") as tmp:
        scorer = SelectionScorer(dense_model, selection_feeds, kinds)
        search = _Search(model, Calibration(calibration_feeds, tmp), scorer, meter, Path(tmp))
        report: dict = {"calibration_samples": search.calibration.samples, "selection_samples": search.scorer.samples,
                        "max_agreement_drop": max_drop, **prepared}
        base = search.scorer(model)
        report["float_closeness"] = base.as_dict()
        indirect = indirect_weight_consumers(model)
        kept: list[dict] = [{"node": name, "op": op_class(node, search.initializers), "for": "check",
                             "reason": f"reads weight {indirect[name]!r} other than as a weight operand: its zeros "
                                       "could not be checked on the integers"}
                            for node in model.graph.node if (name := node.name) in indirect]
        fixed = tuple(indirect)

        # 1. activation calibration method, every supported op type quantized
        scores, failed = {}, {}
        for method in METHODS:
            try:
                scores[method] = search.scorer(search.quantize(Int8Settings(method, None, fixed)))
            except OnnxSparseError as exc:
                # onnxruntime's histogram calibrators fail on some graphs: that method is no candidate there
                failed[method] = str(exc)
                logger.info("int8: %s calibration failed: %s", method, exc)
        if not scores:
            raise OnnxSparseError("onnxruntime could not quantize the model with any calibration method: "
                                  + "; ".join(failed.values()))
        method = max(scores, key=lambda m: (scores[m], -list(METHODS).index(m)))
        report["calibration"] = {"chosen": method, "scores": {m: s.as_dict() for m, s in scores.items()},
                                 "failed": failed}

        # 1b. bias correction: every int8 weight's mean output shift (calibration feeds) taken out of its bias, in
        # this and every later candidate, where that brings the all-int8 model closer to the dense model
        report["bias_correction"] = search.decide_bias_correction(Int8Settings(method, None, fixed), scores[method])

        # 2. op types: everything onnxruntime quantizes, or the weighted ops alone (activations between other
        # ops stay float): the faster of those that agree within max_drop of the float model, else the closer
        target = base.agreement - max_drop
        options = {"all": Int8Settings(method, None, fixed), "weights": Int8Settings(method, WEIGHT_OPS, fixed)}
        candidates = {"all": search.quantize(options["all"]), "weights": search.quantize(options["weights"])}
        op_scores = {name: search.scorer(m) for name, m in candidates.items()}
        good = [name for name, score in op_scores.items() if score.agreement >= target]
        op_ms, op_passes = {}, []
        if len(good) == 2:
            # every op type unless the weighted ops alone are faster by the margin in every interleaved pass: a
            # timing must not flip a choice that a re-run would make the other way
            faster, op_passes = _confirmed(meter, candidates["all"], candidates["weights"], speed_margin)
            op_ms = {"all": min(p[0] for p in op_passes), "weights": min(p[1] for p in op_passes)}
            op_choice = "weights" if faster else "all"
        else:
            op_choice = good[0] if good else max(op_scores, key=lambda name: (op_scores[name], name == "all"))
        settings = options[op_choice]
        report["op_types"] = {"chosen": op_choice, "scores": {k: s.as_dict() for k, s in op_scores.items()},
                              "latency_ms": op_ms, "latency_passes_all_weights": op_passes}
        current = op_scores[op_choice]

        # 3. layers kept in float where the selection feeds say int8 costs too much agreement
        settings, current = _agreement_fallback(search, settings, current, base, max_drop, max_trials, kept, report)

        # 4. speed: op classes whose int8 form is slower stay float; int8 itself only if faster than float, and
        # only if the layers kept float brought it within max_drop of the float model
        if current.agreement < base.agreement - max_drop:
            applied = False
            report["reason"] = (f"int8 agrees {current.agreement:.4f} on the selection split with "
                                f"{sum(k['for'] == 'agreement' for k in kept)} layer(s) kept float, below "
                                f"{base.agreement - max_drop:.4f} (the float model's {base.agreement:.4f} less "
                                f"{max_drop:g}): the float model is kept")
        else:
            settings, applied = _speed(search, settings, speed_margin, kept, report)
        final = search.quantize(settings) if applied else model
        if applied and not check_int8_weights(model, final):
            applied, final = False, model
            report["reason"] = "no weight is int8 after the choices above: the float model is kept"
        report.setdefault("reason", "int8 is faster than float and agrees within the allowed drop"
                          if applied else report.get("reason"))
        if applied:
            # the same model in fewer bytes: float biases, no all-zero weight zero points, where onnxruntime runs
            # it as the same graph with bit-identical outputs
            final, report["compaction"] = compact_int8(final, search.quantize(replace(settings, quantize_bias=False)),
                                                       model, selection_feeds, search.workdir)
            if report["compaction"]["kept"].startswith("float biases"):
                settings = replace(settings, quantize_bias=False)

        # 5. size: weights still float are stored as int8 and computed in float, where that agrees within the
        # allowed drop and onnxruntime folds them back at load
        final, stored = _store(search, final, base, max_drop, report)
        weights = check_int8_weights(model, final)
        if not weights:
            final = original
        else:
            # 6. size: the float tensors left (biases, norm parameters, stored weights' scales) as float16
            halved = _half(search, final, base, max_drop, report)
            if halved is not final:  # the scales read through their Casts are the ones written
                final, weights = halved, check_int8_weights(model, halved)
        report.update(applied=applied, settings=asdict(settings) if applied else None,
                      final_closeness=search.scorer(final).as_dict(), int8_weights=len(weights),
                      kept_float=kept, quantizations=search.quantizations)
    return Int8Choice(final, applied, settings if applied else None, weights, report, stored)


def _store(search: _Search, model: onnx.ModelProto, base: Closeness, max_drop: float,
           report: dict) -> tuple[onnx.ModelProto, tuple[str, ...]]:
    """``model`` with its storable float weights as int8 computed in float, or ``model`` itself when the
    selection feeds or onnxruntime's optimised graph say no (or nothing is storable); the report's
    ``weight_storage`` says which.

    Every float weight is tried first. When that costs too much agreement, each weight (the
    ``MAX_STORAGE_TRIALS`` largest) is scored stored alone, and the longest run of them, least harmful first,
    that stays within the drop together is found by bisection: a sensitive few (depthwise kernels, a layer kept
    float for agreement) stay float and the rest are stored. Speed is proven rather than timed: the stored model
    is kept only when onnxruntime's load-time optimisation folds every pair back into a float constant (then it
    runs the float model's graph; a timing would only add noise to a decision that must repeat)."""
    storable = storable_weights(model)
    entry: dict = {"form": "int8 per output channel, Cast -> Mul to float (folded by onnxruntime at load)",
                   "candidates": list(storable), "stored": [], "attempts": []}
    report["weight_storage"] = entry
    if not storable:
        entry["reason"] = "no weight is left in float, or none can be stored"
        return model, ()
    before = search.scorer(model)
    floor = min(base.agreement - max_drop, before.agreement)
    entry.update(closeness_before=before.as_dict(), target_agreement=floor)

    # bias correction: each stored weight's mean output shift (measured on the calibration feeds) taken out of its
    # bias; kept where storing every weight corrected is closer to the dense model than uncorrected
    shifts, uncorrected = output_shifts(model, storage_deltas(model, storable), search.calibration.feeds)
    corrected = False

    def score(names: tuple[str, ...]) -> tuple[onnx.ModelProto, Closeness]:
        source = apply_shifts(model, {n: shifts[n] for n in names if n in shifts}) if corrected else model
        stored = store_int8_weights(source, names)
        closeness = search.scorer(stored)
        entry["attempts"].append({"weights": len(names), "bias_corrected": corrected, **closeness.as_dict()})
        return stored, closeness

    names = tuple(storable)
    stored, after = score(names)
    if shifts:
        corrected = True
        fixed = score(names)
        corrected = fixed[1] > after
        if corrected:
            stored, after = fixed
    entry["bias_correction"] = {"applied": corrected, "weights": len(shifts) if corrected else 0,
                                "not_correctable": uncorrected}
    if after.agreement < floor:
        sizes = {n: int(np.prod(init.dims)) for init in model.graph.initializer if (n := init.name) in storable}
        trial = sorted(storable, key=lambda n: -sizes[n])[:MAX_STORAGE_TRIALS]
        alone = {n: score((n,))[1] for n in trial}
        entry["alone"] = {n: c.agreement for n, c in alone.items()}
        # two orders, the run of each that stays within the floor found by bisection, the one storing more weight
        # elements kept: least harmful first (closest stored alone, the larger first among equals), and least
        # agreement lost per element stored (a large head layer that costs a little before a depthwise kernel
        # that costs as much). On the recogniser at 0.5 the first stored 45 of 47 weights, the second 22.
        harm = {n: max(0.0, before.agreement - alone[n].agreement) for n in trial}
        orders = {"least harmful": sorted(trial, key=lambda n: (alone[n], sizes[n]), reverse=True),
                  "least harm per element": sorted(trial, key=lambda n: (harm[n] / sizes[n], -sizes[n]))}
        runs = {}
        for label, order in orders.items():
            found = _longest_run(order, floor, score, alone, all_failed=len(order) == len(storable))
            if found is not None:
                runs[label] = found
        entry["orders"] = {label: {"weights": len(run[0]), "elements": sum(sizes[n] for n in run[0])}
                           for label, run in runs.items()}
        if not runs:
            entry["reason"] = f"no weight stored int8 keeps the selection agreement at {floor:.4f} or above: kept float"
            return model, ()
        run, (stored, after) = max(runs.values(), key=lambda found: sum(sizes[n] for n in found[0]))
        names = tuple(n for n in storable if n in set(run))
    entry["closeness"] = after.as_dict()
    left = unfolded_at_load(stored, names, search.workdir)
    if left:
        entry["reason"] = (f"onnxruntime does not fold {len(left)} of the Cast -> Mul pairs at load (e.g. "
                           f"{left[0]!r}): they would run every inference; kept float")
        return model, ()
    entry.update(stored=list(names), reason=f"{len(names)} of {len(storable)} weight(s) stored int8"
                                            f"{', bias-corrected,' if corrected else ''} at selection "
                                            f"agreement {after.agreement:.4f} (at least {floor:.4f}); onnxruntime "
                                            "folds every Cast -> Mul pair at load, so it runs the float graph")
    return stored, names


def _half(search: _Search, model: onnx.ModelProto, base: Closeness, max_drop: float,
          report: dict) -> onnx.ModelProto:
    """``model`` with its float tensors left (:func:`half_candidates`) stored as float16 behind a ``Cast``, or
    ``model`` itself when that costs agreement below the floor the weight storage used, or onnxruntime's load-time
    optimisation leaves any Cast in the graph; the report's ``float16_storage`` says which."""
    names = half_candidates(model)
    entry: dict = {"form": "float16, Cast to float32 (folded by onnxruntime at load)", "candidates": len(names),
                   "stored": []}
    report["float16_storage"] = entry
    if not names:
        entry["reason"] = "no float tensor left that can be stored as float16"
        return model
    before = search.scorer(model)
    floor = min(base.agreement - max_drop, before.agreement)
    halved = store_float16(model, names)
    after = search.scorer(halved)
    chosen = set(names)
    entry.update(closeness_before=before.as_dict(), closeness=after.as_dict(), target_agreement=floor,
                 elements=int(sum(np.prod(i.dims) for i in model.graph.initializer if i.name in chosen)))
    if after.agreement < floor:
        entry["reason"] = (f"{len(names)} float tensor(s) as float16 agree {after.agreement:.4f} on the selection "
                           f"split, below {floor:.4f}: kept float32")
        return model
    left = unfolded_at_load(halved, names, search.workdir)
    if left:
        entry["reason"] = (f"onnxruntime does not fold {len(left)} of the float16 Casts at load (e.g. {left[0]!r}): "
                           "kept float32")
        return model
    entry.update(stored=names, reason=f"{len(names)} float tensor(s) stored as float16 at selection agreement "
                                      f"{after.agreement:.4f} (at least {floor:.4f}); onnxruntime folds every Cast "
                                      "at load")
    return halved


def _longest_run(order: list[str], floor: float, score, alone: dict[str, Closeness], *, all_failed: bool):
    """The longest prefix of ``order`` whose weights stored together keep the agreement at ``floor`` (by bisection:
    agreement need not fall monotonically, so this is a run that holds, not the best subset), with its model and
    closeness; None when not even the first holds. ``all_failed``: the whole of ``order`` is known to fail."""
    good, lo, hi = None, 0, len(order) if all_failed else len(order) + 1  # ``lo`` holds, ``hi`` does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        candidate = score(tuple(order[:mid]))
        if candidate[1].agreement >= floor:
            lo, good = mid, candidate
        else:
            hi = mid
    if lo == 0:
        if alone[order[0]].agreement < floor:
            return None
        lo, good = 1, score((order[0],))
    return order[:lo], good


def _agreement_fallback(search: _Search, settings: Int8Settings, current: Closeness, base: Closeness,
                        max_drop: float, max_trials: int, kept: list[dict], report: dict):
    target = base.agreement - max_drop
    fallback: dict = {"target_agreement": target, "trials": []}
    report["agreement_fallback"] = fallback
    if current.agreement >= target:
        return settings, current
    # a whole weighted op class in float first (a transformer's MatMuls behind a CNN's Convs, say): the
    # class whose float form is closest, when it is closer than the model so far
    classes: dict[str, list[onnx.NodeProto]] = {}
    for node in search.quantized_nodes(settings):
        if node.op_type in WEIGHT_OPS:
            classes.setdefault(op_class(node, search.initializers), []).append(node)
    if len(classes) > 1:
        by_class = []
        for name, nodes in classes.items():
            trial = settings.excluding([n.name for n in nodes])
            score = search.scorer(search.quantize(trial))
            fallback["trials"].append({"float": name, **score.as_dict()})
            by_class.append((score, name, trial))
        score, name, trial = max(by_class, key=lambda item: item[0])
        if score > current:
            kept.extend({"node": n.name, "op": name, "for": "agreement",
                         "reason": f"selection agreement {current.agreement:.4f} with every {name} int8, "
                                   f"{score.agreement:.4f} with them float (target {target:.4f})"}
                        for n in classes[name])
            settings, current = trial, score
    quantized = [n for n in search.quantized_nodes(settings) if n.op_type in WEIGHT_OPS]
    if len(quantized) > max_trials:
        quantized = quantized[: max_trials // 2] + quantized[len(quantized) - (max_trials - max_trials // 2):]
    singles = []
    for node in quantized if current.agreement < target else ():
        score = search.scorer(search.quantize(settings.excluding([node.name])))
        fallback["trials"].append({"float": [node.name], **score.as_dict()})
        singles.append((score, node))
    singles.sort(key=lambda item: item[0], reverse=True)
    for score, node in singles:
        if current.agreement >= target:
            break
        trial = settings.excluding([node.name])
        trial_score = search.scorer(search.quantize(trial))
        if not trial_score > current:  # float here buys nothing on top of the layers already kept
            continue
        kept.append({"node": node.name, "op": op_class(node, search.initializers), "for": "agreement",
                     "reason": f"selection agreement {current.agreement:.4f} with it int8, {trial_score.agreement:.4f} "
                               f"with it float (target {target:.4f})"})
        settings, current = trial, trial_score
    fallback["reached"] = current.agreement >= target
    return settings, current


def _confirmed(latency: Latency, incumbent: onnx.ModelProto, challenger: onnx.ModelProto, margin: float,
               passes: int = FINAL_PASSES) -> tuple[bool, list[list[float]]]:
    """``challenger`` is faster than ``incumbent`` by ``margin`` in every one of ``passes`` interleaved passes."""
    timings = [_timed(latency, [incumbent, challenger], 1) for _ in range(passes)]
    wins = all(b < a * (1 - margin) for a, b in timings)
    return wins, [[round(a, 4), round(b, 4)] for a, b in timings]


def _timed(latency: Latency, models: list[onnx.ModelProto], passes: int) -> list[float]:
    """The fastest of ``passes`` interleaved timings of each model (a noisy neighbour slows all of them)."""
    best = [float("inf")] * len(models)
    for _ in range(passes):
        for i, model in enumerate(models):
            best[i] = min(best[i], latency(model))
    return best


def _speed(search: _Search, settings: Int8Settings, margin: float, kept: list[dict], report: dict,
           passes: int = SPEED_PASSES):
    how = search.latency.describe() if hasattr(search.latency, "describe") else "given latency function"
    timing: dict = {"how": f"{how}; the fastest of {passes} interleaved passes", "trials": []}
    report["latency"] = timing
    current = search.quantize(settings)
    for _ in range(SPEED_ROUNDS):
        classes: dict[str, list[str]] = {}
        for node in search.quantized_nodes(settings):
            classes.setdefault(op_class(node, search.initializers), []).append(node.name)
        names = list(classes)
        trials = [settings.excluding(classes[name]) for name in names]
        models = [search.quantize(trial) for trial in trials]
        current_ms, *trial_ms = _timed(search.latency, [current, *models], passes)
        timing.setdefault("int8_ms", current_ms)
        for name, ms in zip(names, trial_ms):
            timing["trials"].append({"float": name, "ms": ms, "against_ms": current_ms})
        screened = sorted((i for i, ms in enumerate(trial_ms) if ms < current_ms * (1 - margin)),
                          key=trial_ms.__getitem__)
        # a class stays float only where that is faster in every one of FINAL_PASSES further interleaved passes
        # (on the 0.1 ms sample a fastest-of-two screening kept GlobalAveragePool float in one run of four, and
        # that model ran 1.2x the all-int8 one)
        helps = []
        for i in screened:
            wins, timings = _confirmed(search.latency, current, models[i], margin)
            timing["trials"].append({"float": names[i], "confirm_passes": timings, "confirmed": wins})
            if wins:
                helps.append(i)
        if not helps:
            break
        # every class that helped alone, together, against the one that helped most
        chosen = [helps[0]]
        if len(helps) > 1:
            together = settings.excluding([n for i in helps for n in classes[names[i]]])
            model = search.quantize(together)
            wins, timings = _confirmed(search.latency, models[helps[0]], model, 0.0)
            timing["trials"].append({"float": [names[i] for i in helps], "confirm_passes": timings, "confirmed": wins})
            if wins:
                chosen = helps
                trials[helps[0]], models[helps[0]] = together, model
        for i in chosen:
            for node in classes[names[i]]:
                kept.append({"node": node, "op": names[i], "for": "speed",
                             "reason": f"the model ran {current_ms:.3f} ms with {names[i]} int8, {trial_ms[i]:.3f} ms "
                                       "with it float"})
        settings, current = trials[helps[0]], models[helps[0]]
    # the decision that can make a model slower: int8 must be faster by the margin in every one of
    # FINAL_PASSES interleaved passes, not only in the fastest of each (a neighbour that slows one pass of the
    # float model must not make a slower int8 model look faster)
    faster, pairs = _confirmed(search.latency, search.float_model, current, margin)
    float_ms, final_ms = min(p[0] for p in pairs), min(p[1] for p in pairs)
    timing.update(float_ms=float_ms, final_ms=final_ms, final_passes=pairs)
    if not faster:
        report["reason"] = (f"int8 is not faster than float here in every one of {FINAL_PASSES} interleaved passes "
                            f"(fastest {final_ms:.3f} ms against {float_ms:.3f} ms): the float model is kept")
        return settings, False
    return settings, True
