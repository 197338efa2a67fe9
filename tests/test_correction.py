"""Statistics correction: per-channel affine fit folded into the layer, and BatchNorm re-estimation."""

from __future__ import annotations

import contextlib
import time

import pytest
import torch

import graphs
from onnxsparse.errors import OnnxSparseError
from onnxsparse.importer import import_model
from onnxsparse.methods.unipts.evaluator import FitnessEvaluator
from onnxsparse.methods.unipts.search import sparsities_to_zeros
from onnxsparse.signals import OutputSignal, Signals
from onnxsparse.sparsity import allocation
from onnxsparse.sparsity.correction import (
    _channel_stats,
    apply_correction,
    fit_channel_correction,
    reestimate_batchnorm,
)
from onnxsparse.sparsity.masks import apply_masks_inplace, magnitude_mask

CLASS_LOGITS = Signals([OutputSignal("", 0, "class", "class logits (the output itself)", None, 1)])


def _pruned(model, sparsity=0.8):
    imported = import_model(model)
    student = imported.clone_module()
    masks = {layer.name: magnitude_mask(layer.weight.get(student), sparsity) for layer in imported.layers}
    apply_masks_inplace(student, imported.layers, masks)
    return imported, student, masks


def test_channel_correction_matches_dense_statistics_and_keeps_zeros():
    imported, student, masks = _pruned(graphs.export_torch(graphs.tiny_cnn()))
    x = torch.randn(64, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    report = fit_channel_correction(student, imported.module, imported.layers, (x,))
    assert len(report.channel_layers) == len(imported.layers)  # BN folded: every layer has a bias
    first = imported.layers[0]
    stats = {}
    for name, module in (("dense", imported.module), ("sparse", student)):
        handle = module.get_submodule(first.module_path).register_forward_hook(
            lambda _m, _i, out, name=name: stats.__setitem__(name, _channel_stats(out, 1)))
        with torch.no_grad():
            module(x)
        handle.remove()
    alive = masks[first.name].flatten(1).any(dim=1)  # a fully pruned channel is constant: only its mean can match
    assert alive.any() and not alive.all()
    torch.testing.assert_close(stats["sparse"][0], stats["dense"][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(stats["sparse"][1][alive], stats["dense"][1][alive], atol=1e-5, rtol=1e-4)
    for layer in imported.layers:
        w = layer.weight.get(student)
        assert torch.all(w[~masks[layer.name]] == 0)


def test_correction_brings_the_output_closer_to_dense():
    imported, student, _ = _pruned(graphs.export_torch(graphs.tiny_cnn()), 0.9)
    x = torch.randn(128, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = imported.module(x)
        before = (student(x) - dense).pow(2).mean()
        fit_channel_correction(student, imported.module, imported.layers, (x,))
        after = (student(x) - dense).pow(2).mean()
    assert after < before


def test_batchnorm_reestimation_uses_calibration_statistics():
    imported, student, _ = _pruned(graphs.export_torch(graphs.tiny_cnn(), keep_bn=True), 0.5)
    assert imported.has_batchnorm and all(layer.feeds_batchnorm for layer in imported.layers[:3])
    x = torch.randn(96, 1, 12, 12, generator=torch.Generator().manual_seed(2)) * 3 + 1
    layers, seen = reestimate_batchnorm(student, [(x[:48],), (x[48:],)])
    assert (layers, seen) == (3, 96)
    bn = [m for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    conv = student.get_submodule(imported.layers[0].module_path)
    with torch.no_grad():
        out = conv(x)
    torch.testing.assert_close(bn.running_mean, out.mean(dim=(0, 2, 3)), atol=1e-4, rtol=1e-4)
    assert not bn.training and abs(bn.momentum - 0.1) < 1e-6


def test_global_magnitude_allocation_is_exact():
    imported = import_model(graphs.export_torch(graphs.tiny_cnn()))
    sparsities = allocation.global_magnitude(imported.module, imported.layers, 0.7)
    total = sum(layer.numel for layer in imported.layers)
    zeros = sum(round(sparsities[layer.name] * layer.numel) for layer in imported.layers)
    assert zeros == round(0.7 * total)
    assert len(set(sparsities.values())) > 1  # one threshold gives different per-layer sparsities


def test_batchnorm_channel_silenced_by_pruning_keeps_its_dense_variance():
    imported = import_model(graphs.export_torch(graphs.tiny_cnn(), keep_bn=True))
    student = imported.clone_module()
    first = imported.layers[0]
    with torch.no_grad():
        first.weight.get(student)[0].zero_()  # channel 0 of the first conv: constant (zero) output
    bn = [m for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    dense_var = bn.running_var.clone()
    x = torch.randn(64, 1, 12, 12, generator=torch.Generator().manual_seed(4))
    reestimate_batchnorm(student, [(x,)])
    assert bn.running_var[0] == dense_var[0]
    assert torch.all(bn.running_var[1:] != dense_var[1:])


def test_search_candidates_share_the_dense_channel_statistics():
    imported = import_model(graphs.export_torch(graphs.tiny_cnn()))
    x = torch.randn(32, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    teacher_calls = []
    imported.module.register_forward_hook(lambda *_: teacher_calls.append(1))

    def evaluator():
        return FitnessEvaluator(imported.clone_module(), imported.module, imported.layers, [(x,)], signals=CLASS_LOGITS,
                                has_batchnorm=False, channel_inputs=(x,),
                                autocast=contextlib.nullcontext)

    candidates = [sparsities_to_zeros({layer.name: s for layer in imported.layers}, imported.layers)
                  for s in (0.5, 0.8, 0.9)]
    shared = evaluator()
    shared(candidates[0], "channel")
    calls_after_first = len(teacher_calls)
    scores = [shared(zeros, "channel").score for zeros in candidates[1:]]
    assert len(teacher_calls) == calls_after_first  # the teacher ran for the first candidate only
    # the same fitness as an evaluator that computes everything afresh for one candidate
    assert scores == [evaluator()(zeros, "channel").score for zeros in candidates[1:]]


def test_candidate_cost_is_timed_per_correction_mode(monkeypatch):
    # the search runs in one correction mode; its generations are planned from that mode's cost, not from an
    # average that includes the (dearer) modes scored once each before it
    imported = import_model(graphs.export_torch(graphs.tiny_cnn()))
    x = torch.randn(8, 1, 12, 12, generator=torch.Generator().manual_seed(3))
    evaluator = FitnessEvaluator(imported.clone_module(), imported.module, imported.layers, [(x,)],
                                 signals=CLASS_LOGITS, has_batchnorm=False, channel_inputs=(x,),
                                 autocast=contextlib.nullcontext)
    slow = 1.0  # far above a tiny candidate's own cost, even on a loaded machine
    monkeypatch.setattr(evaluator, "correct", lambda mode: time.sleep(slow) if mode == "channel" else None)
    zeros = sparsities_to_zeros({layer.name: 0.5 for layer in imported.layers}, imported.layers)
    evaluator(zeros, "channel")
    evaluator(zeros, "none")
    evaluator(zeros, "none")
    assert evaluator.seconds_per_candidate("none") < slow / 2
    assert evaluator.seconds_per_candidate("channel") >= slow


def test_a_correction_mode_that_is_not_a_mode_name_is_refused_naming_the_modes():
    imported = import_model(graphs.export_torch(graphs.tiny_cnn()))
    x = torch.randn(4, 1, 12, 12, generator=torch.Generator().manual_seed(4))
    evaluator = FitnessEvaluator(imported.clone_module(), imported.module, imported.layers, [(x,)], signals=CLASS_LOGITS,
                                 has_batchnorm=False, channel_inputs=(x,), autocast=contextlib.nullcontext)
    zeros = sparsities_to_zeros({layer.name: 0.5 for layer in imported.layers}, imported.layers)
    allowed = "none, channel, relative, reestimate"
    for mode in (True, False, "bogus"):
        with pytest.raises(OnnxSparseError, match=f"correction mode must be one of {allowed}, got {mode!r}"):
            evaluator(zeros, mode)
        with pytest.raises(OnnxSparseError, match=f"correction mode must be one of {allowed}, got {mode!r}"):
            apply_correction(mode, imported.clone_module(), imported.module, imported.layers, bn_batches=None,
                             channel_inputs=(x,))
