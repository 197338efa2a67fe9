"""Correction never makes a model worse on the holdout, and the quality gate never says PASSED below
--min-agreement (issue: the models users bring)."""

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
from onnxsparse import PruneConfig, prune
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


def test_magnitude_correction_is_never_worse_than_none_on_the_holdout(tmp_path):
    model = graphs.export_torch(graphs.tiny_cnn(), keep_bn=True)
    result = prune(model, tmp_path / "a.onnx", _feeds(), PruneConfig(sparsity=0.5, method="magnitude",
                                                                     min_agreement=0.0), progress=False)
    correction = result.report["method_info"]["correction"]
    assert set(correction["scores"]) == {"none", "channel", "relative", "reestimate"}
    assert correction["scores"][correction["chosen"]] >= correction["scores"]["none"]
    assert correction["measured_on"] == "holdout"
    plain = prune(model, tmp_path / "b.onnx", _feeds(), PruneConfig(sparsity=0.5, method="magnitude",
                                                                    correction=False, min_agreement=0.0),
                  progress=False)
    # the chosen correction was scored on the same holdout the verification uses
    assert result.report["verification"]["agreement"] >= plain.report["verification"]["agreement"] - 1e-9


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
