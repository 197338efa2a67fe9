"""Correction never makes a model worse on the selection split, the quality gate reads a verification split no
decision saw and never says PASSED below --min-agreement, and ``compare`` measures agreement as the gate does."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

import graphs
from onnxsparse import PruneConfig, UniPTSConfig, prune
from onnxsparse.data.calibration import default_held_out_size
from onnxsparse.evaluate import compare
from onnxsparse.errors import QualityGateFailed
from onnxsparse.exporter.verify import output_agreement
from onnxsparse.importer import import_model
from onnxsparse.sparsity.correction import apply_correction, choose_correction, relative_batchnorm
from onnxsparse_cli.main import main

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "fashion_mnist"


def test_chooser_applies_the_best_mode_exactly_and_scores_without_touching_weights():
    imported = import_model(graphs.export_torch(graphs.tiny_cnn(), keep_bn=True))
    x = 3.0 + 2.0 * torch.randn(32, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    base = imported.clone_module()
    with torch.no_grad():
        for layer in imported.layers:
            w = layer.weight.get(base)
            w.mul_((w.abs() > w.abs().flatten().kthvalue(int(0.7 * w.numel())).values).to(w.dtype))
    with torch.no_grad():
        dense_out = imported.module(x)

    def score(module):
        with torch.no_grad():
            return -float(((module.eval()(x) - dense_out) ** 2).mean())

    modes = ("none", "channel", "relative", "reestimate")
    student = copy.deepcopy(base)
    weights = {layer.name: layer.weight.get(student).detach().clone() for layer in imported.layers}
    seen = []

    def scored():
        seen.append({layer.name: torch.equal(layer.weight.get(student), weights[layer.name])
                     for layer in imported.layers})
        return score(student)

    choice = choose_correction(student, imported.module, imported.layers, modes, bn_batches=lambda: [(x,)],
                               channel_inputs=(x,), score=scored)
    assert all(all(s.values()) for s in seen)  # candidates are scored through hooks: weights untouched
    assert set(choice.scores) == set(modes) and choice.scores[choice.mode] == max(choice.scores.values())
    # the kept model is what applying the chosen mode from the same start gives
    direct = copy.deepcopy(base)
    apply_correction(choice.mode, direct, imported.module, imported.layers, bn_batches=[(x,)], channel_inputs=(x,))
    with torch.no_grad():
        torch.testing.assert_close(student.eval()(x), direct.eval()(x), rtol=1e-4, atol=1e-5)
    assert score(student) == pytest.approx(choice.scores[choice.mode], rel=1e-3, abs=1e-6)
    # ties keep the earlier mode
    tie = choose_correction(copy.deepcopy(base), imported.module, imported.layers, modes,
                            bn_batches=lambda: [(x,)], channel_inputs=(x,), score=lambda: 0.0)
    assert tie.mode == "none"


def test_relative_batchnorm_is_a_no_op_on_the_dense_model_and_matches_moments():
    imported = import_model(graphs.export_torch(graphs.tiny_cnn(), keep_bn=True))
    student = imported.clone_module()
    # calibration data unlike the statistics the model was trained with
    x = 3.0 + 2.0 * torch.randn(64, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    relative_batchnorm(student, imported.module, (x,))
    for k, v in student.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        for layer in imported.layers:
            w = layer.weight.get(student)
            w.mul_((w.abs() > w.abs().flatten().kthvalue(int(0.6 * w.numel())).values).to(w.dtype))
    relative_batchnorm(student, imported.module, (x,))
    with torch.no_grad():
        dense_out, sparse_out = imported.module(x), student(x)
    assert torch.isfinite(sparse_out).all() and not torch.equal(dense_out, sparse_out)


def _two_outputs() -> onnx.ModelProto:
    """_mlp with a second, dense output: the hidden activations as (N, 32, 1)."""
    model = _mlp()
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([2], np.int64), "axes"))
    model.graph.node.append(onnx.helper.make_node("Unsqueeze", ["r", "axes"], ["hidden"], name="unsqueeze"))
    model.graph.output.append(onnx.helper.make_tensor_value_info("hidden", onnx.TensorProto.FLOAT, ["N", 32, 1]))
    return model


def test_binary_agreement_is_the_jaccard_index_of_positive_decisions():
    a = np.array([[0.9, 0.2, 0.7, 0.1]], np.float32)
    b = np.array([[0.8, 0.6, 0.3, 0.2]], np.float32)
    value, measure = output_agreement(a, b, "binary")  # positives {0, 2} vs {0, 1}: 1 of 3
    assert value == pytest.approx(1 / 3) and measure.startswith("Jaccard")
    assert output_agreement(a * 0, b * 0, "binary")[0] == 1.0  # neither decides positive: they agree


def test_output_agreement_by_kind():
    a = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]], dtype=np.float32)
    b = np.array([[0.8, 0.2], [0.4, 0.6], [0.3, 0.7], [0.1, 0.9]], dtype=np.float32)
    assert output_agreement(a, b, "class", 1) == (0.75, "top-1 agreement")
    seq_a, seq_b = np.stack([a, a]), np.stack([a, b])  # (N=2, T=4, C=2)
    value, measure = output_agreement(seq_a, seq_b, "sequence", -1)
    assert value == pytest.approx(7 / 8) and measure == "per-position top-1 agreement"
    value, measure = output_agreement(a, a + 0.01, "dense")
    assert 0.99 < value < 1.0 and measure.startswith("R^2")
    assert output_agreement(a, -a, "dense")[0] == 0.0  # worse than the mean: clipped at 0


def _feeds(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return [{"input": (2.0 + 3.0 * rng.standard_normal((8, 1, 12, 12))).astype(np.float32)} for _ in range(n)]


def test_magnitude_correction_is_never_worse_than_none_on_the_selection(tmp_path):
    model = graphs.export_torch(graphs.tiny_cnn(), keep_bn=True)
    result = prune(model, tmp_path / "a.onnx", _feeds(), PruneConfig(sparsity=0.5, method="magnitude",
                                                                     min_agreement=0.0), progress=False)
    correction = result.report["method_info"]["correction"]
    assert set(correction["scores"]) == {"none", "channel", "relative", "reestimate"}
    assert correction["scores"][correction["chosen"]] >= correction["scores"]["none"]
    assert correction["measured_on"] == "selection"
    assert result.report["quality_gate"]["split"] == "verification"
    calibration = result.report["calibration"]
    assert calibration["verification"] > 0 and calibration["selection"] > 0
    assert result.report["verification"]["samples"] == calibration["verification"]
    gate = result.report["quality_gate"]
    assert 0.0 <= gate["selection_agreement"] <= 1.0 and gate["interval_95"][0] <= gate["agreement"]


def _decisions(info):
    """A method report without its wall-clock measurements."""
    if isinstance(info, dict):
        return {k: _decisions(v) for k, v in info.items() if "time" not in k and "seconds" not in k}
    if isinstance(info, list):
        return [_decisions(v) for v in info]
    return info


def _poisoned(x: np.ndarray, seed: int) -> np.ndarray:
    """``x`` with the samples the verification split takes (the first of the seeded permutation) replaced."""
    index = np.random.default_rng(seed).permutation(len(x))[: default_held_out_size(len(x))]
    out = x.copy()
    out[index] = np.random.default_rng(99).uniform(-50, 50, out[index].shape).astype(np.float32)
    return out


@pytest.mark.parametrize("method", ["magnitude", "unipts"])
def test_no_decision_reads_the_verification_split(tmp_path, method):
    """Poisoning the verification samples changes the gate's figure and nothing else: the same weights are
    written and every choice the method reports (correction, start, keep rule) is the same."""
    model = graphs.export_torch(graphs.tiny_cnn(), keep_bn=True)
    x = (2.0 + 3.0 * np.random.default_rng(0).standard_normal((96, 1, 12, 12))).astype(np.float32)
    unipts = UniPTSConfig(iterations=6, generations=1, population=4, parents=2, crossover=1, mutation=1,
                          fitness_samples=32, time_budget=None)
    config = PruneConfig(sparsity=0.6, method=method, device="cpu", min_agreement=0.0, batch_size=16, unipts=unipts)
    clean = prune(model, tmp_path / "clean.onnx", {"input": x}, config, progress=False)
    dirty = prune(model, tmp_path / "dirty.onnx", {"input": _poisoned(x, config.seed)}, config, progress=False)
    assert clean.report["calibration"]["verification"] == 32
    assert _decisions(clean.report["method_info"]) == _decisions(dirty.report["method_info"])
    assert (tmp_path / "clean.onnx").read_bytes() == (tmp_path / "dirty.onnx").read_bytes()
    # the gate read the poisoned samples: its comparison of the two models moved
    assert clean.report["verification"]["outputs"] != dirty.report["verification"]["outputs"]


def test_compare_and_prune_report_the_same_agreement(tmp_path):
    """The gate's figure is what ``compare --min-agreement`` reads, on the same samples: here a model with a
    class output behind a Softmax and a dense output, so the lowest per-output agreement is not top-1."""
    model = _two_outputs()
    rng = np.random.default_rng(3)
    x = rng.standard_normal((120, 16)).astype(np.float32)
    out, report = tmp_path / "s.onnx", tmp_path / "r.json"
    result = prune(model, out, {"x": x}, PruneConfig(sparsity=0.7, method="magnitude", min_agreement=0.0),
                   progress=False, report_path=report)
    index = np.random.default_rng(0).permutation(len(x))[: result.report["calibration"]["verification"]]
    np.save(tmp_path / "verification.npy", x[index])
    dense_path = tmp_path / "dense.onnx"
    onnx.save(model, dense_path)
    compared = compare(dense_path, out, tmp_path / "verification.npy")
    gate = result.report["quality_gate"]
    assert compared.agreement == pytest.approx(gate["agreement"], abs=1e-12)
    assert [o["agreement"] for o in compared.outputs] == pytest.approx(
        [o["agreement"] for o in result.report["verification"]["outputs"]], abs=1e-12)
    assert [o["measure"] for o in compared.outputs] == ["top-1 agreement", "R^2 (1 - SSE/SST)"]
    cli = CliRunner().invoke(main, ["compare", str(dense_path), str(out), "--data", str(tmp_path / "verification.npy"),
                                    "--min-agreement", f"{gate['agreement'] + 1e-6:.9f}"])
    assert cli.exit_code == 1 and "FAILED: agreement" in cli.output


def _mlp() -> onnx.ModelProto:
    """x (N, 16) -> MatMul -> Relu -> MatMul -> Softmax: 8 classes, no bias, so pruning moves every logit."""
    rng = np.random.default_rng(0)
    h = onnx.helper
    inits = [onnx.numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w1"),
             onnx.numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32), "w2")]
    nodes = [h.make_node("MatMul", ["x", "w1"], ["a"], name="fc1"), h.make_node("Relu", ["a"], ["r"], name="relu"),
             h.make_node("MatMul", ["r", "w2"], ["z"], name="fc2"),
             h.make_node("Softmax", ["z"], ["probs"], name="softmax", axis=1)]
    graph = h.make_graph(nodes, "mlp", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 16])],
                         [h.make_tensor_value_info("probs", onnx.TensorProto.FLOAT, ["N", 8])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])


def test_gate_fails_a_broken_model_writes_nothing_but_the_report(tmp_path):
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((16, 16)).astype(np.float32)} for _ in range(8)]
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    with pytest.raises(QualityGateFailed) as info:
        prune(_mlp(), out, feeds, PruneConfig(sparsity=0.95, method="magnitude", correction=False,
                                              min_agreement=0.8), progress=False, report_path=report)
    assert not out.exists()
    saved = json.loads(report.read_text())
    gate = saved["quality_gate"]
    assert gate["passed"] is False and gate["agreement"] == info.value.agreement < 0.8
    assert saved["output"] is None
    # the logits behind the Softmax are what distillation and fitness compare
    assert saved["signals"][0]["kind"] == "class" and "Softmax" in saved["signals"][0]["source"]
    assert "below --min-agreement 80.00%" in str(info.value)


@pytest.mark.slow
def test_cli_gate_on_the_sample_uniform_magnitude_09_without_correction(tmp_path):
    out = tmp_path / "broken.onnx"
    result = CliRunner().invoke(main, [
        "prune", str(SAMPLE / "model.onnx"), "--sparsity", "0.9", "--method", "magnitude", "--no-correction",
        "--calib", str(SAMPLE / "calib"), "--max-samples", "256", "-o", str(out), "-q"])
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output and not out.exists()
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("FAILED: agreement ") and "< --min-agreement 80.00%" in last
    figure = float(last.split()[2].rstrip("%")) / 100
    assert figure < 0.8
    assert "by " in result.output and "points; nothing was written" in result.output
    # the same run with the gate off writes the model and says PASSED
    ok = CliRunner().invoke(main, [
        "prune", str(SAMPLE / "model.onnx"), "--sparsity", "0.9", "--method", "magnitude", "--no-correction",
        "--calib", str(SAMPLE / "calib"), "--max-samples", "256", "-o", str(out), "-q", "--min-agreement", "0"])
    assert ok.exit_code == 0 and ok.output.strip().splitlines()[-1].startswith("PASSED") and out.exists()


def test_sparsity_zero_passes_the_gate_with_full_agreement(tmp_path):
    model = graphs.export_torch(graphs.tiny_cnn(), keep_bn=True)
    result = prune(model, tmp_path / "z.onnx", _feeds(), PruneConfig(sparsity=0.0), progress=False)
    assert result.report["quality_gate"]["passed"] and result.report["verification"]["agreement"] == 1.0
