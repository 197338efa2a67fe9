"""--quantize int8: zeros survive exactly, weights are per-channel symmetric, the choices follow the selection
data and the (injected) timings, the gate reads the int8 model, inspect counts integer zeros."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

import graphs
from onnxsparse import PruneConfig, prune
from onnxsparse.config import UniPTSConfig
from onnxsparse.errors import OnnxSparseError, QualityGateFailed
from onnxsparse.inspect import inspect_model
from onnxsparse.quantize import Calibration, Int8Settings, check_int8_weights, choose_int8, int8_weights, quantize_int8
from onnxsparse.quantize import search as search_module
from onnxsparse.quantize.latency import batch_feed, measure_latency
from onnxsparse.quantize.quantize import named_copy
from onnxsparse_cli.main import main

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "fashion_mnist"


def _cnn_feeds(n: int = 4, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input": (2.0 + 3.0 * rng.standard_normal((8, 1, 12, 12))).astype(np.float32)} for _ in range(n)]


def _pruned_cnn(sparsity: float = 0.7) -> onnx.ModelProto:
    """The tiny CNN (BN folded, a grouped Conv) with the smallest weights of every layer zeroed and one output
    channel of the first Conv zeroed entirely (its scale would be 0 without care)."""
    model = graphs.export_torch(graphs.tiny_cnn())
    for init in model.graph.initializer:
        a = numpy_helper.to_array(init).copy()
        if a.ndim < 2:
            continue
        a[np.abs(a) < np.quantile(np.abs(a), sparsity)] = 0
        if a.ndim == 4 and a.shape[1] == 1:
            a[0] = 0
        init.CopyFrom(numpy_helper.from_array(a.astype(np.float32), init.name))
    return named_copy(model)


def _quantize(model: onnx.ModelProto, tmp_path: Path, settings: Int8Settings = Int8Settings()) -> onnx.ModelProto:
    onnx.save_model(model, str(tmp_path / "float.onnx"))
    return quantize_int8(tmp_path / "float.onnx", Calibration(_cnn_feeds(), tmp_path), settings, tmp_path / "q.onnx")


def test_int8_weights_are_per_channel_symmetric_and_keep_every_zero(tmp_path):
    model = _pruned_cnn()
    quantized = _quantize(model, tmp_path)
    weights = check_int8_weights(model, quantized)
    floats = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert {w.node for w in weights.values()} == {n.name for n in convs}
    for name, w in weights.items():
        assert w.values.dtype == np.int8 and not w.zero_point.any()
        assert w.scale.shape == (w.values.shape[w.axis],)
        zeros = floats[name] == 0
        assert zeros.any() and (w.centred()[zeros] == 0).all()
        # dequantized, every kept weight is within half a step of its float value
        step = w.scale.reshape([-1 if i == w.axis else 1 for i in range(w.values.ndim)])
        assert np.all(np.abs(w.centred() * step - floats[name]) <= step / 2 + 1e-7)
    first = next(w for w in weights.values() if w.values.ndim == 4 and w.values.shape[1] == 1)
    assert (first.centred()[0] == 0).all()


def test_a_moved_zero_or_an_asymmetric_weight_is_refused(tmp_path):
    model = _pruned_cnn()
    quantized = _quantize(model, tmp_path)
    w = next(iter(int8_weights(model, quantized).values()))
    floats = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == w.tensor))
    moved = w.values.copy()
    moved[np.unravel_index(np.flatnonzero(floats == 0)[0], floats.shape)] = 1
    broken = onnx.ModelProto()
    broken.CopyFrom(quantized)
    init = next(i for i in broken.graph.initializer if i.name == w.initializer)
    init.CopyFrom(numpy_helper.from_array(moved, w.initializer))
    with pytest.raises(OnnxSparseError, match="exactly zero are not zero after int8"):
        check_int8_weights(model, broken)
    broken.CopyFrom(quantized)
    zp = next(n for n in broken.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == w.initializer).input[2]
    init = next(i for i in broken.graph.initializer if i.name == zp)
    init.CopyFrom(numpy_helper.from_array(np.full(w.zero_point.shape, 2, np.int8), zp))
    with pytest.raises(OnnxSparseError, match="non-zero zero point"):
        check_int8_weights(model, broken)


def _dq_count(model: onnx.ModelProto, inits: dict[str, onnx.TensorProto], grouped: bool) -> int:
    """Conv nodes of ``model`` whose weight is int8, grouped or not."""
    producer = {o: n for n in model.graph.node for o in n.output}
    count = 0
    for node in model.graph.node:
        if node.op_type != "Conv" or producer.get(node.input[1]) is None:
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if producer[node.input[1]].op_type == "DequantizeLinear" and (group > 1) == grouped:
            count += 1
    return count


class _ScriptedLatency:
    """Milliseconds from the graph: 10 in float, ``gain`` less per int8 plain Conv, ``grouped_cost`` more
    per int8 grouped Conv. No clock is read."""

    def __init__(self, gain: float, grouped_cost: float):
        self.gain, self.grouped_cost, self.calls = gain, grouped_cost, 0

    def __call__(self, model: onnx.ModelProto) -> float:
        self.calls += 1
        inits = {i.name: i for i in model.graph.initializer}
        return (10.0 - self.gain * _dq_count(model, inits, grouped=False)
                + self.grouped_cost * _dq_count(model, inits, grouped=True))


def test_an_op_class_whose_int8_form_is_slower_stays_float(tmp_path):
    model = _pruned_cnn()
    latency = _ScriptedLatency(gain=1.0, grouped_cost=2.0)
    choice = choose_int8(model, model, _cnn_feeds(), _cnn_feeds(seed=1), kinds=[("class", 1)], latency=latency,
                         max_drop=1.0)
    grouped = [n.name for n in model.graph.node if n.op_type == "Conv"
               and next((a.i for a in n.attribute if a.name == "group"), 1) > 1]
    assert choice.applied and set(grouped) <= set(choice.settings.exclude)
    kept = {k["node"]: k for k in choice.report["kept_float"]}
    assert set(grouped) <= set(kept) and all(kept[g]["for"] == "speed" and kept[g]["op"] == "Conv (grouped)"
                                             for g in grouped)
    inits = {i.name: i for i in choice.model.graph.initializer}
    assert _dq_count(choice.model, inits, grouped=True) == 0 and _dq_count(choice.model, inits, grouped=False) == 2
    timing = choice.report["latency"]
    assert timing["float_ms"] == 10.0 and timing["final_ms"] == 8.0 and timing["int8_ms"] == 10.0
    assert latency.calls > 4
    # bias correction was decided once, on the all-int8 candidate, by the selection closeness
    bc = choice.report["bias_correction"]
    plain, fixed = bc["closeness_uncorrected"], bc["closeness_corrected"]
    assert bc["applied"] == ((fixed["agreement"], fixed["r2"]) > (plain["agreement"], plain["r2"]))
    assert plain == choice.report["calibration"]["scores"][choice.report["calibration"]["chosen"]]


def test_int8_slower_than_float_keeps_float_compute_with_the_weights_stored_int8(tmp_path):
    model = _pruned_cnn()
    choice = choose_int8(model, model, _cnn_feeds(), _cnn_feeds(seed=1), kinds=[("class", 1)],
                         latency=_ScriptedLatency(gain=-1.0, grouped_cost=1.0), max_drop=1.0)
    assert not choice.applied and "not faster than float" in choice.report["reason"]
    assert not any(n.op_type == "DequantizeLinear" for n in choice.model.graph.node)
    weights = {n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm")}
    assert set(choice.stored) == weights == set(choice.weights)
    assert choice.report["weight_storage"]["stored"] == list(choice.stored)
    floats = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for name, w in choice.weights.items():
        assert w.values.dtype == np.int8 and (w.centred()[floats[name] == 0] == 0).all()
    # every weight stored, without and with bias correction; the closer kept
    entry = choice.report["weight_storage"]
    plain, fixed = entry["attempts"][:2]
    assert plain["weights"] == fixed["weights"] == len(weights)
    assert not plain["bias_corrected"] and fixed["bias_corrected"]
    closer = (fixed["agreement"], fixed["r2"]) > (plain["agreement"], plain["r2"])
    assert entry["bias_correction"]["applied"] == closer
    assert entry["closeness"] == {k: (fixed if entry["bias_correction"]["applied"] else plain)[k]
                                  for k in ("agreement", "r2")}


class _SlowCast:
    """10 ms plus 1 per Cast node (int8 compute is no faster than float here)."""

    def __call__(self, model: onnx.ModelProto) -> float:
        return 10.0 + sum(n.op_type == "Cast" for n in model.graph.node)


def test_weights_stored_int8_only_where_folded_at_load_and_within_the_agreement_drop(monkeypatch):
    model = _pruned_cnn()
    # a runtime that would run the pairs every inference: nothing is stored
    monkeypatch.setattr(search_module, "unfolded_at_load", lambda stored, names, workdir: list(names))
    slow = choose_int8(model, model, _cnn_feeds(), _cnn_feeds(seed=1), kinds=[("class", 1)], latency=_SlowCast(),
                       max_drop=1.0)
    assert not slow.applied and not slow.stored and not slow.weights
    assert "does not fold" in slow.report["weight_storage"]["reason"] and slow.model.graph.node[0].op_type != "Cast"
    monkeypatch.undo()
    # the outlier weight's int8 form collapses the output: stored with the other, it costs the agreement; alone,
    # the other one does not (no fallback trial here: int8 compute is refused for speed and agreement)
    mlp = _outlier_mlp()
    choice = choose_int8(mlp, mlp, _mlp_feeds(4), _mlp_feeds(8, seed=1), kinds=[("class", 1)],
                         latency=lambda m: 10.0, max_drop=0.05, max_trials=0)
    assert not choice.applied and choice.report["weight_storage"]["candidates"] == ["w1", "w2"]
    entry = choice.report["weight_storage"]
    assert entry["attempts"][0]["weights"] == 2 and entry["attempts"][0]["agreement"] < 0.6
    assert entry["alone"]["w1"] < 0.6 <= entry["alone"]["w2"] and choice.stored == ("w2",)


def test_stored_int8_weights_compute_the_dequantized_weights_at_float_speed_and_inspect_reads_them(tmp_path):
    import onnxruntime as ort

    from onnxsparse.quantize.storage import storable_weights, store_int8_weights, unfolded_at_load

    model = _pruned_cnn()
    names = list(storable_weights(model))
    assert len(names) == 4
    stored = store_int8_weights(model, names)
    onnx.checker.check_model(stored, full_check=True)
    weights = int8_weights(model, stored)
    # the float model with the dequantized weights computes what the stored model computes
    dequantized = onnx.ModelProto()
    dequantized.CopyFrom(model)
    for init in dequantized.graph.initializer:
        if init.name in weights:
            w = weights[init.name]
            step = w.scale.reshape([-1 if i == w.axis else 1 for i in range(w.values.ndim)])
            init.CopyFrom(numpy_helper.from_array((w.centred() * step).astype(np.float32), init.name))
    feed = _cnn_feeds(1)[0]
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
           for m in (stored, dequantized)]
    np.testing.assert_allclose(run[0], run[1], rtol=1e-5, atol=1e-6)
    # onnxruntime folds every Cast -> Mul into a float constant at load: the optimised graph computes in float
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(stored.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "optimised.onnx")).graph.node}
    assert "Cast" not in ops and "Mul" not in ops and "Conv" in ops
    assert unfolded_at_load(stored, names, tmp_path) == []
    # a pair onnxruntime cannot fold (its scale is a graph input, not a constant) is named
    unfoldable = onnx.ModelProto()
    unfoldable.CopyFrom(stored)
    scale = next(i for i in unfoldable.graph.initializer if i.name == f"{names[0]}_int8_scale")
    unfoldable.graph.input.append(helper.make_tensor_value_info(scale.name, onnx.TensorProto.FLOAT, list(scale.dims)))
    assert unfolded_at_load(unfoldable, names, tmp_path) == [names[0]]
    floats = {r.node: r.zeros for r in inspect_model(model)}
    rows = inspect_model(stored)
    assert {r.node for r in rows} == set(floats) and all(r.tensor.endswith("_int8") for r in rows)
    # zeros are counted on the integers: every float zero, plus weights that rounded to zero
    assert all(r.zeros >= floats[r.node] for r in rows)


def _outlier_mlp() -> onnx.ModelProto:
    """x (N, 16) -> MatMul -> Relu -> MatMul -> Softmax, where every column of the first weight holds one
    weight 1000 on an input that is always 0: per-channel int8 rounds all its other weights to zero."""
    rng = np.random.default_rng(0)
    w1 = (0.5 * rng.standard_normal((16, 32))).astype(np.float32)
    w1[0] = 1000.0
    inits = [numpy_helper.from_array(w1, "w1"),
             numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="fc1"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["z"], name="fc2"),
             helper.make_node("Softmax", ["z"], ["probs"], name="softmax", axis=1)]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("probs", onnx.TensorProto.FLOAT, ["N", 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _mlp_feeds(n: int = 8, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        x = rng.standard_normal((16, 16)).astype(np.float32)
        x[:, 0] = 0
        feeds.append({"x": x})
    return feeds


def _faster_int8(model: onnx.ModelProto) -> float:
    return 10.0 - sum(n.op_type == "DequantizeLinear" for n in model.graph.node)


def test_int8_that_stays_below_the_agreement_target_is_not_applied():
    mlp = _outlier_mlp()
    # no fallback trial: nothing brings the int8 model back within the drop, so int8 compute is refused however
    # fast it is, and the weight that breaks it is not stored int8 either
    choice = choose_int8(mlp, mlp, _mlp_feeds(4), _mlp_feeds(8, seed=1), kinds=[("class", 1)],
                         latency=_faster_int8, max_drop=0.05, max_trials=0)
    assert not choice.applied and "below" in choice.report["reason"] and "latency" not in choice.report
    assert "w1" not in choice.stored


def test_a_layer_whose_int8_form_breaks_agreement_stays_float():
    model = _outlier_mlp()
    choice = choose_int8(model, model, _mlp_feeds(4), _mlp_feeds(8, seed=1), kinds=[("class", 1)],
                         latency=_faster_int8, max_drop=0.05)
    fallback = choice.report["agreement_fallback"]
    scores = choice.report["calibration"]["scores"]
    assert max(s["agreement"] for s in scores.values()) < 0.6  # every calibration: fc1 int8 collapses the output
    assert fallback["reached"] and choice.applied
    assert [k["node"] for k in choice.report["kept_float"] if k["for"] == "agreement"] == ["fc1"]
    assert set(choice.weights) == {"w2"} and choice.report["final_closeness"]["agreement"] >= 0.95
    # fc1 (kept float for agreement) is tried stored int8; its int8 weight breaks the output: it stays float
    storage = choice.report["weight_storage"]
    assert storage["candidates"] == ["w1"] and not choice.stored and "kept float" in storage["reason"]


def test_prune_quantize_int8_on_the_tiny_cnn_keeps_2_4_and_gates_the_int8_file(tmp_path, monkeypatch):
    monkeypatch.setattr(search_module, "LatencyMeter", lambda feed: _faster_int8)
    model = graphs.export_torch(graphs.tiny_cnn(), keep_bn=True)
    out, report_path = tmp_path / "q.onnx", tmp_path / "r.json"
    result = prune(model, out, _cnn_feeds(8), PruneConfig(sparsity=0.5, method="magnitude", pattern="2:4",
                                                           quantize="int8", min_agreement=0.0),
                   progress=False, report_path=report_path)
    report = json.loads(report_path.read_text())
    quant = report["quantize"]
    assert quant["applied"] and quant["int8_weights"] == len(result.layers)
    assert report["verification"]["export_max_rel_error"] == quant["export_max_rel_error"] < 1e-3
    saved = onnx.load(str(out))
    assert {p.key: p.value for p in saved.metadata_props}["onnxsparse.quantize"] == "int8"
    rows = {r.node: r for r in inspect_model(out)}
    for row in result.layers:
        info = rows[row["node"]]
        assert info.zeros == row["zeros"] >= row["target_zeros"]
        if row["pattern"] == "2:4":
            assert info.satisfies_2_4
    # the gate read the int8 file: its agreement is what onnxruntime computes on it
    assert report["quality_gate"]["agreement"] == report["verification"]["agreement"]


def test_quantization_that_breaks_the_gate_writes_nothing_and_exits_3(tmp_path, monkeypatch):
    import functools

    import onnxsparse.pipeline as pipeline_module

    monkeypatch.setattr(search_module, "LatencyMeter", lambda feed: _faster_int8)
    # no layer kept in float for agreement, and any agreement drop allowed: the int8 model is the one that
    # collapses, and only the gate (on samples no choice saw) stands between it and the file
    monkeypatch.setattr(search_module, "_agreement_fallback",
                        lambda search, settings, current, *rest: (settings, current))
    monkeypatch.setattr(pipeline_module, "choose_int8", functools.partial(choose_int8, max_drop=1.0))
    model_path, calib = tmp_path / "mlp.onnx", tmp_path / "x.npy"
    onnx.save_model(_outlier_mlp(), str(model_path))
    np.save(calib, np.concatenate([f["x"] for f in _mlp_feeds(8)]))
    out, report_path = tmp_path / "q.onnx", tmp_path / "r.json"
    with pytest.raises(QualityGateFailed):
        prune(model_path, out, str(calib), PruneConfig(sparsity=0.1, method="magnitude", quantize="int8",
                                                        correction=False), progress=False, report_path=report_path)
    assert not out.exists()
    report = json.loads(report_path.read_text())
    assert report["quantize"]["applied"] and report["quality_gate"]["passed"] is False
    result = CliRunner().invoke(main, ["prune", str(model_path), "--sparsity", "0.1", "--method", "magnitude",
                                       "--no-correction", "--quantize", "int8", "--calib", str(calib), "-o", str(out),
                                       "-q"])
    assert result.exit_code == 3, result.output
    assert not out.exists()
    # the same float model passes: the int8 model is what the gate refused
    plain = prune(model_path, out, str(calib), PruneConfig(sparsity=0.1, method="magnitude", correction=False),
                  progress=False)
    assert plain.report["quality_gate"]["passed"] and out.exists()


def test_inspect_counts_an_integer_equal_to_its_zero_point_as_zero(tmp_path):
    q = np.array([[3, 3, 5, 3], [1, 3, 3, 3]], dtype=np.int8).reshape(2, 4, 1, 1)
    inits = [numpy_helper.from_array(q, "wq"), numpy_helper.from_array(np.float32(0.1), "s"),
             numpy_helper.from_array(np.int8(3), "zp")]
    nodes = [helper.make_node("DequantizeLinear", ["wq", "s", "zp"], ["w"], name="dq"),
             helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 3, 3])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2, 3, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    (row,) = inspect_model(model)
    assert (row.node, row.params, row.zeros) == ("conv", 8, 6)
    assert row.nm == "1:4" and row.satisfies_2_4


def test_config_and_cli_validate_quantize():
    with pytest.raises(OnnxSparseError, match="--quantize must be one of int8"):
        PruneConfig(sparsity=0.5, quantize="int4")
    result = CliRunner().invoke(main, ["prune", "m.onnx", "--sparsity", "0.5", "--calib", "c", "--quantize", "int4",
                                       "--dry-run"])
    assert result.exit_code == 2 and "int4" in result.output
    with pytest.raises(OnnxSparseError, match=r"--fake-quant-fraction must be in \[0, 1\], got 1.5"):
        UniPTSConfig(fake_quant_fraction=1.5)
    result = CliRunner().invoke(main, ["prune", "m.onnx", "--sparsity", "0.5", "--calib", "c", "--quantize", "int8",
                                       "--fake-quant-fraction", "-0.1", "--dry-run"])
    assert result.exit_code != 0 and "--fake-quant-fraction must be in [0, 1]" in result.output
    assert "--fake-quant-fraction" not in CliRunner().invoke(main, ["prune", "--help"]).output


def test_latency_is_a_median_after_warm_up_with_an_injected_clock():
    model = _outlier_mlp()
    ticks = iter(np.cumsum([0.0] + [0.001, 0.0] * 3 + [0.005, 0.0] * 2 + [0.002, 0.0] * 100))
    result = measure_latency(model, batch_feed(_mlp_feeds(1)[0], 1), warmup=3, min_runs=5, min_seconds=0.0,
                             clock=lambda: float(next(ticks)))
    # the clock is only read around timed runs: 5 runs of 1, 1, 1, 5, 5 ms
    assert result.runs == 5 and result.median_ms == pytest.approx(1.0) and result.batch == 1
    assert batch_feed({"x": np.zeros((3, 2))}, 8)["x"].shape == (8, 2)


@pytest.mark.slow
def test_sample_magnitude_int8_keeps_every_zero_of_the_float_run_and_eval_reads_it(tmp_path, monkeypatch):
    monkeypatch.setattr(search_module, "LatencyMeter", lambda feed: _faster_int8)
    runner = CliRunner()
    args = ["prune", str(SAMPLE / "model.onnx"), "--sparsity", "0.7", "--method", "magnitude",
            "--calib", str(SAMPLE / "calib"), "--max-samples", "384", "-q"]
    int8, plain = tmp_path / "int8.onnx", tmp_path / "fp32.onnx"
    result = runner.invoke(main, [*args, "--quantize", "int8", "-o", str(int8), "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert runner.invoke(main, [*args, "-o", str(plain)]).exit_code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["quantize"]["applied"] and report["quality_gate"]["passed"]
    floats = {r.node: r for r in inspect_model(plain)}
    weights = check_int8_weights(onnx.load(str(plain)), named_copy(onnx.load(str(int8))))
    assert len(weights) == len(floats) == 11
    f_inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(plain)).graph.initializer}
    for name, w in weights.items():
        assert (w.centred()[f_inits[name] == 0] == 0).all()
    for row in inspect_model(int8):
        assert row.zeros >= floats[row.node].zeros and row.sparsity == pytest.approx(0.7, abs=0.01)
    shown = runner.invoke(main, ["inspect", str(int8), "--json"])
    assert json.loads(shown.output)["sparsity"] == pytest.approx(report["achieved_sparsity"])
    evaluated = runner.invoke(main, ["eval", str(int8), "--data", str(SAMPLE / "test"), "--limit", "200", "--json"])
    assert evaluated.exit_code == 0 and json.loads(evaluated.output)["top1"] > 0.7


def test_op_types_are_the_faster_set_when_both_agree():
    model = _pruned_cnn()
    chosen = []
    for per_q in (1.0, -1.0, 0.01):
        def latency(m: onnx.ModelProto, per_q=per_q) -> float:  # scripted: each QuantizeLinear costs per_q ms
            return 10.0 + per_q * sum(n.op_type == "QuantizeLinear" for n in m.graph.node)

        ops = choose_int8(model, model, _cnn_feeds(), _cnn_feeds(seed=1), kinds=[("class", 1)], latency=latency,
                          max_drop=1.0).report["op_types"]
        assert set(ops["latency_ms"]) == {"all", "weights"} and ops["latency_ms"]["all"] != ops["latency_ms"]["weights"]
        assert len(ops["latency_passes_all_weights"]) == search_module.FINAL_PASSES
        faster = ops["latency_ms"]["weights"] < ops["latency_ms"]["all"] * (1 - search_module.SPEED_MARGIN)
        assert ops["chosen"] == ("weights" if faster else "all")
        chosen.append(ops["chosen"])
    # the timing decides, not a fixed preference; the weighted ops alone only when faster by the margin (a 0.01 ms
    # a node difference on 10 ms is noise: every op type stays int8)
    assert chosen[0] != chosen[1] and chosen[2] == "all"


def _grid_model() -> onnx.ModelProto:
    """The pruned tiny CNN with a MatMul head behind it: Conv (dense, grouped), Gemm and MatMul weights."""
    model = _pruned_cnn()
    rng = np.random.default_rng(3)
    head = rng.standard_normal((10, 6)).astype(np.float32)
    head[:, 2] = 0  # an output channel of zeros
    head[head < -0.8] = 0
    model.graph.initializer.append(numpy_helper.from_array(head, "head_w"))
    out = model.graph.output[0]
    model.graph.node.append(helper.make_node("MatMul", [out.name, "head_w"], ["head_out"], name="head"))
    model.graph.output.remove(out)
    model.graph.output.append(helper.make_tensor_value_info("head_out", onnx.TensorProto.FLOAT, ["N", 6]))
    return model


def test_fake_quant_weights_are_the_int8_weights_onnxruntime_writes_dequantized(tmp_path):
    import torch

    from onnxsparse.importer import import_model
    from onnxsparse.methods.unipts.fakequant import fake_quant_weight

    model = _grid_model()
    weights = check_int8_weights(model, _quantize(model, tmp_path))
    imported = import_model(model)
    assert {layer.op_type for layer in imported.layers} >= {"Conv", "Gemm", "MatMul"}
    for layer in imported.layers:
        w = layer.weight.get(imported.module).detach().clone().requires_grad_(True)
        fq = fake_quant_weight(w, layer.out_axis_weight)
        int8 = weights[layer.weight.source.name]
        step = int8.scale.reshape([-1 if i == int8.axis else 1 for i in range(int8.values.ndim)])
        dequantized = (int8.values.astype(np.float32) * step).astype(np.float32)
        assert np.array_equal(layer.weight.layout.to_onnx(fq), dequantized), layer.name
        assert (fq[w == 0] == 0).all() and (fq != w).any()
        fq.sum().backward()  # straight through
        assert torch.equal(w.grad, torch.ones_like(w))


def test_fake_quant_activation_parameters_are_onnxruntime_s():
    from onnxruntime.quantization.quant_utils import compute_scale_zp

    from onnxsparse.methods.unipts.fakequant import activation_qparams

    for low, high in ((-1.3, 4.7), (0.2, 3.0), (-2.0, -0.5), (0.0, 0.0)):
        zero_point, scale = compute_scale_zp(np.array(low, np.float32), np.array(high, np.float32),
                                             np.array(0, np.uint8), np.array(255, np.uint8))
        assert activation_qparams(float(np.float32(low)), float(np.float32(high))) == (float(scale), int(zero_point))


def test_unipts_int8_keeps_the_closer_of_the_plain_and_fake_quant_students(tmp_path, monkeypatch):
    monkeypatch.setattr(search_module, "LatencyMeter", lambda feed: _faster_int8)
    model = graphs.export_torch(graphs.tiny_cnn(), keep_bn=True)
    out, report_path = tmp_path / "q.onnx", tmp_path / "r.json"
    config = PruneConfig(sparsity=0.6, quantize="int8", min_agreement=0.0, selection_size=16, verify_size=16, batch_size=16,
                         unipts=UniPTSConfig(search=False, iterations=12, fake_quant_fraction=0.5))
    result = prune(model, out, _cnn_feeds(12), config, progress=False, report_path=report_path)
    report = json.loads(report_path.read_text())
    fake = report["method_info"]["training"]["fake_quant"]
    assert fake["ran"] and fake["iterations"] == 6 and fake["from_step"] == 6 and not fake["weights_skipped"]
    assert fake["lr"] < report["method_info"]["training"]["lr"]
    sets = report["quantize"]["weight_sets"]
    assert report["method_info"]["weight_set"] == sets and set(sets["scores"]) == {"plain", "fake-quant"}
    score = {k: (v["agreement"], v["r2"]) for k, v in sets["scores"].items()}
    assert sets["kept"] == max(score, key=lambda k: (score[k], k == "plain"))
    final = report["quantize"]["final_closeness"]
    assert (final["agreement"], final["r2"]) == score[sets["kept"]]
    rows = {r.node: r for r in inspect_model(out)}
    for row in result.layers:
        assert rows[row["node"]].zeros == row["zeros"] >= row["target_zeros"]
    # without --quantize there is no second student to train
    plain = prune(model, None, _cnn_feeds(12), PruneConfig(sparsity=0.6, min_agreement=0.0, selection_size=16,
                  verify_size=16, unipts=config.unipts), progress=False)
    assert "fake_quant" not in plain.report["method_info"]["training"]
    assert "weight_set" not in plain.report["method_info"]


def _conv_bn_graph() -> onnx.ModelProto:
    """x -> Conv (no bias, pruned) -> BN -> Relu -> Conv (bias) -> BN -> y, and a Conv whose output feeds a BN and
    the graph output z too (that pair cannot be folded)."""
    rng = np.random.default_rng(0)

    def bn(prefix: str, c: int) -> list[onnx.TensorProto]:
        return [numpy_helper.from_array((rng.random(c) + 0.5).astype(np.float32), f"{prefix}_gamma"),
                numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), f"{prefix}_beta"),
                numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), f"{prefix}_mean"),
                numpy_helper.from_array((rng.random(c) + 0.1).astype(np.float32), f"{prefix}_var")]

    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    w1[np.abs(w1) < 0.8] = 0
    inits = [numpy_helper.from_array(w1, "w1"), *bn("bn1", 8),
             numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b2"), *bn("bn2", 4),
             numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "w3"), *bn("bn3", 4)]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "bn1_gamma", "bn1_beta", "bn1_mean", "bn1_var"], ["n1"],
                              name="bn1", epsilon=1e-3),
             helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2"),
             helper.make_node("BatchNormalization", ["c2", "bn2_gamma", "bn2_beta", "bn2_mean", "bn2_var"], ["y"],
                              name="bn2"),
             helper.make_node("Conv", ["x", "w3"], ["z"], name="conv3"),
             helper.make_node("BatchNormalization", ["z", "bn3_gamma", "bn3_beta", "bn3_mean", "bn3_var"], ["n3"],
                              name="bn3"),
             helper.make_node("Add", ["y", "n3"], ["s"], name="add")]
    vi = lambda n, c: helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["N", c, 6, 6])  # noqa: E731
    graph = helper.make_graph(nodes, "convbn", [vi("x", 3)], [vi("s", 4), vi("z", 4)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_batchnorm_folds_into_its_conv_keeping_weight_names_and_zeros():
    import onnxruntime as ort

    from onnxsparse.quantize.prepare import fold_batchnorm

    model = _conv_bn_graph()
    folded, names = fold_batchnorm(model)
    onnx.checker.check_model(folded, full_check=True)
    assert names == ["bn1", "bn2"]  # bn3's Conv output is also a graph output
    assert [n.op_type for n in folded.graph.node].count("BatchNormalization") == 1
    before = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    after = {i.name: numpy_helper.to_array(i) for i in folded.graph.initializer}
    assert {"w1", "w2", "b2", "w3"} <= set(after) and not {"bn1_gamma", "bn2_var"} & set(after)
    assert ((after["w1"] == 0) == (before["w1"] == 0)).all()  # rescaled per channel: zeros exactly where they were
    x = np.random.default_rng(1).standard_normal((2, 3, 6, 6)).astype(np.float32)
    runs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
            for m in (model, folded)]
    for a, b in zip(*runs):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_int8_search_quantizes_the_folded_model_and_returns_the_input_when_nothing_is_kept(monkeypatch):
    model = _conv_bn_graph()
    feeds = [{"x": np.random.default_rng(s).standard_normal((4, 3, 6, 6)).astype(np.float32)} for s in range(3)]
    faster = choose_int8(model, model, feeds, feeds, latency=_faster_int8, max_drop=1.0)
    assert faster.applied and faster.report["batchnorm_folded"] == 2
    assert [n.op_type for n in faster.model.graph.node].count("BatchNormalization") == 1
    assert {"w1", "w2"} <= set(faster.weights)
    monkeypatch.setattr(search_module, "unfolded_at_load", lambda stored, names, workdir: list(names))
    slow = choose_int8(model, model, feeds, feeds, latency=_SlowCast(), max_drop=1.0)
    assert not slow.applied and not slow.weights
    assert [n.op_type for n in slow.model.graph.node] == [n.op_type for n in model.graph.node]


def test_weights_in_constant_nodes_are_quantized_and_stored_by_the_constant_s_name():
    model = _conv_bn_graph()
    for name in ("w1", "w2"):  # as paddle2onnx writes weights: Constant nodes, no initializer
        init = next(i for i in model.graph.initializer if i.name == name)
        model.graph.initializer.remove(init)
        model.graph.node.insert(0, helper.make_node("Constant", [], [name], name=f"const_{name}", value=init))
    onnx.checker.check_model(model)
    feeds = [{"x": np.random.default_rng(s).standard_normal((4, 3, 6, 6)).astype(np.float32)} for s in range(3)]
    faster = choose_int8(model, model, feeds, feeds, latency=_faster_int8, max_drop=1.0)
    assert faster.applied and faster.report["constants_as_initializers"] == 2
    assert {"w1", "w2"} <= set(faster.weights) and not faster.stored
    stored = choose_int8(model, model, feeds, feeds, latency=lambda m: 10.0, max_drop=1.0)
    assert not stored.applied and {"w1", "w2"} <= set(stored.stored) == set(stored.weights)
    w1 = numpy_helper.to_array(next(n for n in model.graph.node if n.name == "const_w1").attribute[0].t)
    assert (stored.weights["w1"].centred()[w1 == 0] == 0).all()


def test_a_whole_op_class_kept_float_for_agreement_when_that_is_closest():
    model = _outlier_mlp()  # fc1 (MatMul) breaks int8; fc2 becomes a Gemm: two weighted op classes
    fc2 = next(n for n in model.graph.node if n.name == "fc2")
    fc2.op_type = "Gemm"
    choice = choose_int8(model, model, _mlp_feeds(4), _mlp_feeds(8, seed=1), kinds=[("class", 1)],
                         latency=_faster_int8, max_drop=0.05)
    trials = choice.report["agreement_fallback"]["trials"]
    assert {t["float"] for t in trials[:2]} == {"MatMul", "Gemm"}
    assert choice.applied and choice.report["agreement_fallback"]["reached"]
    kept = [k for k in choice.report["kept_float"] if k["for"] == "agreement"]
    assert [k["node"] for k in kept] == ["fc1"] and kept[0]["op"] == "MatMul" and "every MatMul" in kept[0]["reason"]
    assert len(trials) == 2  # reached by the class: no single-layer trial


def test_storage_keeps_the_weights_that_stay_within_the_drop_together():
    mlp = _outlier_mlp()  # w1's int8 form breaks the output, w2's does not
    choice = choose_int8(mlp, mlp, _mlp_feeds(4), _mlp_feeds(8, seed=1), kinds=[("class", 1)],
                         latency=lambda m: 10.0, max_drop=0.05)  # int8 compute no faster: refused for speed
    assert not choice.applied
    storage = choice.report["weight_storage"]
    assert storage["alone"]["w1"] < 0.6 <= storage["alone"]["w2"]
    assert storage["attempts"][0]["weights"] == 2 and storage["attempts"][0]["agreement"] < 0.6
    assert choice.stored == ("w2",) and set(choice.weights) == {"w2"} and "1 of 2" in storage["reason"]
    assert storage["orders"] == {order: {"weights": 1, "elements": 256}
                                 for order in ("least harmful", "least harm per element")}


class _NoisyInt8:
    """10 ms for a float model; an int8 model alternates 8 and 11 ms (a neighbour's load, or a kernel that is
    not faster): the fastest of its passes would call it faster."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, model: onnx.ModelProto) -> float:
        if not any(n.op_type == "DequantizeLinear" for n in model.graph.node):
            return 10.0
        self.calls += 1
        return 8.0 if self.calls % 2 else 11.0


def test_int8_must_be_faster_in_every_final_pass():
    model = _pruned_cnn()
    choice = choose_int8(model, model, _cnn_feeds(), _cnn_feeds(seed=1), kinds=[("class", 1)],
                         latency=_NoisyInt8(), max_drop=1.0)
    timing = choice.report["latency"]
    assert len(timing["final_passes"]) == search_module.FINAL_PASSES and timing["final_ms"] == 8.0
    assert not choice.applied and "every one of" in choice.report["reason"]


def test_compact_int8_keeps_the_smaller_file_only_where_onnxruntime_runs_it_identically(tmp_path):
    from dataclasses import replace

    from onnxsparse.quantize.compact import compact_int8, drop_weight_zero_points, same_when_deployed, \
        weight_dequantizers

    model = _pruned_cnn()
    standard = _quantize(model, tmp_path)
    float_bias = _quantize(model, tmp_path, replace(Int8Settings(), quantize_bias=False))
    assert any(i.data_type == onnx.TensorProto.INT32 for i in standard.graph.initializer)
    assert not any(i.data_type == onnx.TensorProto.INT32 for i in float_bias.graph.initializer)
    feeds = _cnn_feeds(2, seed=1)
    compact, entry = compact_int8(standard, float_bias, model, feeds, tmp_path)
    assert entry["zip_bytes"] < entry["zip_bytes_before"] and entry["kept"] != "as quantize_static writes it"
    assert entry["tried"][-1]["same_when_deployed"] and entry["tried"][-1]["form"] == entry["kept"]
    # the kept form: no value_info the float model lacked, the zeros and the integers are the standard file's
    assert not model.graph.value_info and not compact.graph.value_info
    before, after = check_int8_weights(model, standard), check_int8_weights(model, compact)
    assert before.keys() == after.keys()
    for name in before:
        assert np.array_equal(before[name].values, after[name].values)
    assert same_when_deployed(standard, compact, feeds, tmp_path)
    # only all-zero int8 zero points are dropped; a changed model is not the same when deployed
    found = weight_dequantizers(standard)
    assert found and all("Conv" in readers or "Gemm" in readers for readers in found.values())
    dropped = drop_weight_zero_points(standard, set(found))
    assert all(len(n.input) == 2 for n in dropped.graph.node if n.name in found)
    assert len(dropped.graph.initializer) < len(standard.graph.initializer)
    broken = onnx.ModelProto()
    broken.CopyFrom(compact)
    scale = next(i for i in broken.graph.initializer if i.data_type == onnx.TensorProto.FLOAT
                 and i.name.endswith("_scale") and len(i.dims) == 1 and i.dims[0] > 1)
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(1.5), scale.name))
    assert not same_when_deployed(standard, broken, feeds, tmp_path)
    # a float-bias quantization that does not compute what the standard one does is never kept
    wrong = onnx.ModelProto()
    wrong.CopyFrom(float_bias)
    bias = next(i for i in wrong.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 1
                and not i.name.endswith("_scale") and i.dims[0] > 1)
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + np.float32(0.5), bias.name))
    kept, entry = compact_int8(standard, wrong, model, feeds, tmp_path)
    assert not entry["kept"].startswith("float biases")
    assert any(t["form"].startswith("float biases") and not t["same_when_deployed"] for t in entry["tried"])
    assert same_when_deployed(standard, kept, feeds, tmp_path)
