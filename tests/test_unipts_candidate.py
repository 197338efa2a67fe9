"""UniPTS candidates: captured as copies, materialised in place, regrown from the dense candidate, compared by the
keep rule; and no other UniPTS module copies or loads the student's whole state."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

import graphs
from onnxsparse import PruneConfig, UniPTSConfig, prune
from onnxsparse.errors import OnnxSparseError
from onnxsparse.importer import import_model
from onnxsparse.methods.unipts.candidate import Candidate, materialise, regrown, weight_key
from onnxsparse.methods.unipts.keep import keep
from onnxsparse.metrics import Agreement
from onnxsparse.signals import OutputSignal, Signals

CLASS_LOGITS = Signals([OutputSignal("", 0, "class", "class logits (the output itself)", None, 1)])
UNIPTS = Path(__file__).resolve().parents[1] / "onnxsparse" / "methods" / "unipts"


def _student():
    imported = import_model(graphs.export_torch(graphs.tiny_cnn()))
    return imported, imported.clone_module()


def test_capture_is_a_copy_and_materialise_sets_the_live_tensors_in_place():
    imported, student = _student()
    layer = imported.layers[0]
    candidate = Candidate.capture(student, "dense")
    live = layer.weight.get(student)
    before = live.detach().clone()
    with torch.no_grad():
        live.mul_(0.0)
    assert torch.equal(candidate.state[weight_key(layer)], before)  # the student's change left it alone
    materialise(candidate, student)
    assert layer.weight.get(student) is live and torch.equal(live, before)
    # a materialised candidate is still the caller's own: changing the student again does not reach it
    with torch.no_grad():
        live.add_(1.0)
    assert torch.equal(candidate.state[weight_key(layer)], before)


def test_regrown_gives_pruned_weights_their_dense_values_and_leaves_the_rest():
    imported, student = _student()
    dense = Candidate.capture(student, "dense")
    masks = {}
    with torch.no_grad():
        for i, layer in enumerate(imported.layers):
            w = layer.weight.get(student)
            masks[layer.name] = torch.rand(w.shape, generator=torch.Generator().manual_seed(i)) > 0.5
            w.mul_(masks[layer.name]).mul_(0.5)  # pruned, and the kept weights changed as a start's would be
    start = Candidate.capture(student, "magnitude+correction", masks=masks)
    grown = regrown(start, dense, imported.layers)
    for layer in imported.layers:
        key, mask = weight_key(layer), masks[layer.name]
        assert torch.equal(grown.state[key][mask], start.state[key][mask])
        assert torch.equal(grown.state[key][~mask], dense.state[key][~mask])
        assert torch.all(start.state[key][~mask] == 0)  # the start itself is left pruned
    others = set(start.state) - {weight_key(layer) for layer in imported.layers}
    assert others and all(grown.state[k] is start.state[k] for k in others)
    with pytest.raises(OnnxSparseError, match="no masks"):
        regrown(dense, dense, imported.layers)


def _scored(noise: float, samples: int = 64) -> Agreement:
    generator = torch.Generator().manual_seed(7)
    teacher = torch.randn(samples, 10, generator=generator)
    student = teacher + noise * torch.randn(samples, 10, generator=generator)
    agreement = Agreement(CLASS_LOGITS)
    agreement.add([student], [teacher])
    return agreement


def test_keep_rule_takes_the_trained_candidate_only_when_resolved_closer():
    state: dict = {}
    start = Candidate("start", state, score=_scored(1.0))
    closer = Candidate("trained", state, score=_scored(0.1))
    farther = Candidate("trained", state, score=_scored(2.0))
    same = Candidate("trained", state, score=_scored(1.0))
    kept, paired = keep(closer, start)
    assert kept is closer and paired.gain > 0
    assert keep(farther, start)[0] is start
    assert keep(same, start)[0] is start  # indistinguishable: the start, a deterministic fit
    with pytest.raises(OnnxSparseError, match="scored"):
        keep(Candidate("trained", state), start)


def test_only_the_candidate_module_copies_or_loads_the_students_whole_state():
    offenders = []
    for path in sorted(UNIPTS.glob("*.py")):
        if path.name == "candidate.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            name = (node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name)
                    else None)
            if name in ("copy_state", "load_state", "load_state_dict", "state_dict") and not (
                    isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in ("optimizer", "optim")):
                offenders.append(f"{path.name}:{node.lineno} {name}")
    assert offenders == []


def test_magnitude_start_trains_from_dense_values_under_its_masks(tmp_path, monkeypatch):
    import onnxsparse.methods.unipts.method as method

    real_reconstruct, real_train = method.reconstruct_all, method._train
    seen = {}

    def worse(ctx, *args, **kwargs):  # reconstructed starts made worse, so that the magnitude start wins
        out = real_reconstruct(ctx, *args, **kwargs)
        with torch.no_grad():
            for layer in ctx.layers:
                layer.weight.get(ctx.student).mul_(-1.0)
        return out

    def spy(ctx, cfg, signals, start, *args, **kwargs):
        seen["start"], seen["masks"] = start, {name: mask.clone() for name, mask in start.masks.items()}
        seen["weights"] = {layer.name: (layer.weight.get(ctx.teacher).detach().clone(),
                                        layer.weight.get(ctx.student).detach().clone()) for layer in ctx.layers}
        return real_train(ctx, cfg, signals, start, *args, **kwargs)

    monkeypatch.setattr(method, "reconstruct_all", worse)
    monkeypatch.setattr(method, "_train", spy)
    feeds = np.random.default_rng(0).standard_normal((48, 1, 12, 12)).astype(np.float32)
    config = PruneConfig(sparsity=0.7, device="cpu", batch_size=8, selection_size=16, min_agreement=0.0,
                         unipts=UniPTSConfig(search=False, iterations=4, fitness_samples=16))
    result = prune(graphs.export_torch(graphs.tiny_cnn()), tmp_path / "o.onnx", feeds, config, progress=False)
    assert result.report["method_info"]["start"]["chosen"] == "magnitude+correction"
    masks = seen["start"].masks
    pruned = 0
    for name, (dense, live) in seen["weights"].items():
        mask = masks[name]
        assert torch.equal(live[~mask], dense[~mask])  # the pruned weights start from their dense values
        pruned += int((~mask).sum())
    assert pruned > 0 and result.report["method_info"]["kept"] in ("trained", "start")
    # training moved its own masks, not the start candidate's
    assert all(torch.equal(masks[name], seen["masks"][name]) for name in masks)
