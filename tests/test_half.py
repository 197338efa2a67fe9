"""float16 storage of the float tensors an int8 file still holds: which tensors, what the runtime computes, that
every int8 weight stays readable, and that the search keeps the form only where agreement and folding allow."""

from __future__ import annotations

import io
import zipfile
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from onnxsparse.inspect import inspect_model
from onnxsparse.quantize import check_int8_weights, choose_int8, int8_weights
from onnxsparse.quantize import search as search_module
from onnxsparse.quantize.half import MIN_ELEMENTS, half_candidates, store_float16
from onnxsparse.quantize.search import Closeness
from onnxsparse.quantize.storage import storable_weights, store_int8_weights, unfolded_at_load
from test_quantize import _cnn_feeds, _pruned_cnn, _ScriptedLatency


def _run(model: onnx.ModelProto, feed: dict) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _zipped(model: onnx.ModelProto) -> int:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("m.onnx", model.SerializeToString())
    return len(buffer.getvalue())


def _stored_cnn() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    model = _pruned_cnn()
    return model, store_int8_weights(model, list(storable_weights(model)))


def test_candidates_are_biases_and_scales_never_weights_qdq_tensors_inputs_or_what_float16_cannot_hold():
    model, stored = _stored_cnn()
    weights = set(storable_weights(model))
    names = half_candidates(stored)
    inits = {i.name: i for i in stored.graph.initializer}
    # the 16-channel Convs' biases and scales; the 8-channel ones and the 10-class head are under MIN_ELEMENTS
    assert MIN_ELEMENTS == 16
    assert sorted(names) == sorted(n for n, i in inits.items() if i.data_type == onnx.TensorProto.FLOAT
                                   and int(np.prod(i.dims)) >= 16)
    assert any(n.endswith("_int8_scale") for n in names) and not weights & set(names)
    # a float weight operand, a graph input, a tensor beyond float16's range: left alone
    bias = next(n for n in names if not n.endswith("_int8_scale"))
    assert not set(storable_weights(model)) & set(half_candidates(model))
    huge = onnx.ModelProto()
    huge.CopyFrom(stored)
    init = next(i for i in huge.graph.initializer if i.name == bias)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1e6, bias))
    assert bias not in half_candidates(huge)
    as_input = onnx.ModelProto()
    as_input.CopyFrom(stored)
    as_input.graph.input.append(helper.make_tensor_value_info(bias, onnx.TensorProto.FLOAT, list(inits[bias].dims)))
    assert bias not in half_candidates(as_input)


def test_candidates_skip_every_tensor_a_quantized_node_group_reads(tmp_path):
    from onnxsparse.quantize import Calibration, Int8Settings, quantize_int8

    model = _pruned_cnn()
    onnx.save_model(model, str(tmp_path / "float.onnx"))
    qdq = quantize_int8(tmp_path / "float.onnx", Calibration(_cnn_feeds(), tmp_path), Int8Settings(),
                        tmp_path / "q.onnx")
    read_by_groups = set()
    dequantized = {o for n in qdq.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    for node in qdq.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or dequantized & set(node.input):
            read_by_groups.update(node.input)
    # float tensors a per-tensor rule would take (16 values or more) are read by the groups, and none is taken
    large = {i.name for i in qdq.graph.initializer if i.data_type == onnx.TensorProto.FLOAT
             and int(np.prod(i.dims)) >= MIN_ELEMENTS}
    assert large & read_by_groups
    assert not read_by_groups & set(half_candidates(qdq))


def test_float16_storage_computes_the_rounded_values_is_folded_at_load_and_keeps_int8_weights_readable(tmp_path):
    model, stored = _stored_cnn()
    names = half_candidates(stored)
    halved = store_float16(stored, names)
    onnx.checker.check_model(halved, full_check=True)
    halves = [i for i in halved.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert len(halves) == len(names) and [n.op_type for n in halved.graph.node[:len(names)]] == ["Cast"] * len(names)
    # the same model with each tensor rounded to float16 in place computes what the float16 form computes
    rounded = onnx.ModelProto()
    rounded.CopyFrom(stored)
    for init in rounded.graph.initializer:
        if init.name in names:
            values = numpy_helper.to_array(init).astype(np.float16).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(values, init.name))
    feed = _cnn_feeds(1)[0]
    np.testing.assert_array_equal(_run(halved, feed), _run(rounded, feed))
    np.testing.assert_allclose(_run(halved, feed), _run(stored, feed), rtol=1e-2, atol=1e-2)
    assert unfolded_at_load(halved, names, tmp_path) == []
    # int8 weights whose scale is now a float16 tensor behind a Cast: still read, still checked, still counted
    before, after = check_int8_weights(model, stored), check_int8_weights(model, halved)
    assert set(after) == set(before) == set(storable_weights(model))
    for name, w in after.items():
        np.testing.assert_array_equal(w.values, before[name].values)
        np.testing.assert_allclose(w.scale, before[name].scale, rtol=2.0 ** -11)
    assert int8_weights(model, halved).keys() == before.keys()
    assert [(r.node, r.zeros) for r in inspect_model(halved)] == [(r.node, r.zeros) for r in inspect_model(stored)]
    assert _zipped(halved) < _zipped(stored)
    with pytest.raises(ValueError, match="not a float32 initializer"):
        store_float16(halved, names[:1])


def test_the_search_stores_float16_when_agreement_holds_and_onnxruntime_folds_it(monkeypatch):
    model = _pruned_cnn()
    choice = choose_int8(model, model, _cnn_feeds(), _cnn_feeds(seed=1), kinds=[("class", 1)],
                         latency=_ScriptedLatency(gain=-1.0, grouped_cost=1.0), max_drop=1.0)
    entry = choice.report["float16_storage"]
    assert not choice.applied and entry["stored"] and entry["candidates"] == len(entry["stored"])
    halves = {i.name for i in choice.model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    assert halves == {f"{n}_fp16" for n in entry["stored"]}
    assert set(choice.weights) == set(storable_weights(model))  # every stored weight still read as int8
    # a runtime that would run the Casts every inference: kept float32, said so
    def halves_unfolded(m: onnx.ModelProto, names, workdir) -> list[str]:
        return list(names) if any(i.data_type == onnx.TensorProto.FLOAT16 for i in m.graph.initializer) else []

    monkeypatch.setattr(search_module, "unfolded_at_load", halves_unfolded)
    refused = choose_int8(model, model, _cnn_feeds(), _cnn_feeds(seed=1), kinds=[("class", 1)],
                          latency=_ScriptedLatency(gain=-1.0, grouped_cost=1.0), max_drop=1.0)
    assert not refused.report["float16_storage"]["stored"]
    assert "does not fold" in refused.report["float16_storage"]["reason"]
    assert not any(i.data_type == onnx.TensorProto.FLOAT16 for i in refused.model.graph.initializer)


def test_float16_storage_is_refused_below_the_agreement_floor(tmp_path):
    _, stored = _stored_cnn()
    report: dict = {}
    # a scorer that finds any float16 tensor costly: closeness 0.9 against 1.0 for the float32 form
    search = SimpleNamespace(workdir=tmp_path, scorer=lambda m: Closeness(
        0.9 if any(i.data_type == onnx.TensorProto.FLOAT16 for i in m.graph.initializer) else 1.0, 1.0))
    kept = search_module._half(search, stored, Closeness(1.0, 1.0), 0.05, report)
    assert kept is stored and not report["float16_storage"]["stored"]
    assert "below 0.9500" in report["float16_storage"]["reason"]
    # within the allowed drop: stored
    allowed = search_module._half(search, stored, Closeness(1.0, 1.0), 0.2, report)
    assert report["float16_storage"]["stored"] == half_candidates(stored)
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in allowed.graph.initializer)
