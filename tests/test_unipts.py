"""UniPTS: allocation arithmetic, mask gradients, the base-decayed objective, DST, and an end-to-end run."""

from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import graphs
from onnxsparse.config import PruneConfig, UniPTSConfig
from onnxsparse.errors import OnnxSparseError
from onnxsparse.methods.scoring import AgreementScorer
from onnxsparse.methods.unipts.dst import TrainPlan, lr_at, train
from onnxsparse.signals import OutputSignal, Signals, raw_output_kind
from onnxsparse.metrics import Agreement
from onnxsparse.methods.unipts.objective import (
    Distillation,
    base_decayed_kl,
    default_gamma,
    normalised_mse,
)
from onnxsparse.methods.unipts.search import (
    EvolutionarySearch,
    fit_to_target,
    genome_to_zeros,
    integer_zeros,
    reduce_regrow,
)
from onnxsparse.sparsity.masks import attach_masks, bake_masks, current_masks, magnitude_mask

# One class-logit output compared as itself; every output dense.
CLASS_LOGITS = Signals([OutputSignal("", 0, "class", "class logits (the output itself)", None, 1)])
DENSE = Signals([])


# ------------------------------------------------------------------------------------------ allocation
def test_reduce_regrow_without_clamping_is_exact():
    # n = [300, 700], P = 0.5, r = 0.1: R = 100; genome [0, ln 2]: softmax = [1/3, 2/3], regrow [33.3, 66.7]
    # zeros 0.6 * n - regrow = [146.667, 353.333] (sum 500): floors 146 + 353, the last one to the larger
    # remainder -> [147, 353]
    n = [300, 700]
    s = reduce_regrow([0.0, math.log(2.0)], n, 0.5, 0.1)
    np.testing.assert_allclose(s * n, [180 - 100 / 3, 420 - 200 / 3])
    assert genome_to_zeros([0.0, math.log(2.0)], n, 0.5, 0.1, 0.99).tolist() == [147, 353]
    # the all-equal genome: N = 100, R = 10, every layer regrows R / L = 2.5
    np.testing.assert_allclose(reduce_regrow([0.9] * 4, [10, 20, 30, 40], 0.5, 0.1) * [10, 20, 30, 40],
                               [6 - 2.5, 12 - 2.5, 18 - 2.5, 24 - 2.5])  # (P + r) n - R / L


def test_clamp_at_zero_redistributes_hand_computed():
    # n = [10, 90, 900], P = 0.9, r = 0.05: R = 50, s = 0.95 - (50/3)/n = [-0.7167, 0.7648, 0.9315]
    # layer 0 clamps to 0 (7.1667 zeros too many); the other two shift by delta = -7.1667/990:
    # s = [0, 0.757576, 0.924242] -> zeros 68.18 + 831.82 = 900 -> integers [0, 68, 832]
    n = [10, 90, 900]
    s = fit_to_target(reduce_regrow([1.0, 1.0, 1.0], n, 0.9, 0.05), n, 0.9, 0.99)
    np.testing.assert_allclose(s, [0.0, 0.95 - 50 / 270 - 7.1666666667 / 990, 0.95 - 50 / 2700 - 7.1666666667 / 990],
                               rtol=1e-9)
    assert genome_to_zeros([1.0, 1.0, 1.0], n, 0.9, 0.05, 0.99).tolist() == [0, 68, 832]


def test_clamp_at_s_max_redistributes_hand_computed():
    # n = [100, 900], P = 0.96, r = 0.05: R = 50, softmax([-100, 0]) ~ [0, 1]:
    # s = [1.01, 1.01 - 50/900] -> layer 0 clamps at 0.99 (2 zeros short) -> layer 1 gets 2/900 more:
    # zeros [99, 859 + 2] = [99, 861], total 960 = 0.96 * 1000
    n = [100, 900]
    assert genome_to_zeros([-100.0, 0.0], n, 0.96, 0.05, 0.99).tolist() == [99, 861]


def test_target_above_s_max_is_uniform():
    zeros = genome_to_zeros([0.3, -2.0, 5.0], [100, 100, 100], 0.995, 0.05, 0.99)
    assert zeros.sum() == round(0.995 * 300)
    assert zeros.max() - zeros.min() <= 1


@pytest.mark.parametrize("seed", range(5))
def test_random_genomes_sum_exactly(seed):
    rng = np.random.default_rng(seed)
    for _ in range(200):
        layers = int(rng.integers(1, 40))
        n = rng.integers(1, 20_000, layers)
        target = float(rng.random() * 0.999)
        genome = rng.standard_normal(layers) * rng.random() * 30
        zeros = genome_to_zeros(genome, n, target, 0.05, 0.99)
        assert zeros.sum() == round(target * n.sum())
        assert ((zeros >= 0) & (zeros <= n)).all()
        s = fit_to_target(reduce_regrow(genome, n, target, 0.05), n, target, 0.99)
        assert np.abs(zeros - s * n).max() <= 1 + 1e-6  # within one weight of the continuous share
        assert (s >= 0).all() and (s <= max(0.99, target) + 1e-12).all()


def test_integer_zeros_removes_when_rounding_up():
    assert integer_zeros(np.array([0.5, 0.5]), [3, 3], 0.5, 0.99).sum() == 3


def test_search_keeps_random_children_and_is_deterministic():
    n = [100, 200, 300, 400]
    seen: list[bytes] = []

    def evaluate(zeros):
        seen.append(zeros.tobytes())
        agreement = Agreement(DENSE)
        agreement.add([torch.tensor([float(zeros[0])])], [torch.tensor([0.0])])  # prefers few zeros in layer 0
        return agreement

    def run(seed):
        seen.clear()
        search = EvolutionarySearch(evaluate, n, target=0.7, regrow=0.05, s_max=0.99, population=8, parents=3,
                                    crossover=2, mutation=2, mutation_prob=0.5, rng=np.random.default_rng(seed))
        children = search.children([np.zeros(4), np.ones(4), np.full(4, 2.0)])
        assert len(children) == 8  # 2 crossover (incl. the all-equal genome) + 2 mutation + 4 random
        result = search.run(3)
        assert result.generations == 3 and len(result.history) == 3
        assert result.zeros.sum() == round(0.7 * sum(n))
        return result.zeros.tolist(), list(seen)

    assert run(1) == run(1)


# ------------------------------------------------------------------------------------------ masks
def test_straight_through_gradient_and_decay_on_4x4():
    torch.manual_seed(0)
    w = torch.randn(4, 4)
    decay = 0.3
    lin = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    mask = magnitude_mask(w, 0.5)
    attach_masks(lin, [_layer_stub()], {"w": mask}, {"w": 0.5}, dynamic=True, decay=decay)
    lin.train()
    g = torch.randn(4, 4)
    (lin.weight * g).sum().backward()
    m = current_masks(lin, [_layer_stub()])["w"].float()
    assert int((m == 0).sum()) == 8
    expected = g + decay * (1 - m) * w
    torch.testing.assert_close(lin.parametrizations.weight.original.grad, expected)
    torch.testing.assert_close(lin.weight.detach(), w * m)


def _layer_stub():
    class _W:
        module_path = ""
        attr = "weight"

        def owner(self, module):
            return module

        def get(self, module):
            return module.weight

    class _L:
        name = "w"
        weight = _W()

    return _L()


def test_masks_recompute_and_pruned_weights_regrow():
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.5, 0.2, 0.1]]))
    attach_masks(lin, [_layer_stub()], {"w": magnitude_mask(lin.weight, 0.5)}, {"w": 0.5}, dynamic=True)
    lin.train()
    lin(torch.ones(1, 4))
    assert current_masks(lin, [_layer_stub()])["w"].tolist() == [[True, True, False, False]]
    opt = torch.optim.SGD(lin.parameters(), lr=1.0)
    for _ in range(2):  # push the pruned 0.2 past the kept 0.5 with a gradient on the pruned weight
        opt.zero_grad()
        (lin.weight * torch.tensor([[0.0, 0.4, -0.6, 0.0]])).sum().backward()
        opt.step()
        lin(torch.ones(1, 4))
    assert current_masks(lin, [_layer_stub()])["w"].tolist() == [[True, False, True, False]]
    lin.eval()
    frozen = current_masks(lin, [_layer_stub()])["w"].clone()
    with torch.no_grad():
        lin.parametrizations.weight.original[0, 3] = 100.0  # eval: the stored mask stays
    lin(torch.ones(1, 4))
    assert torch.equal(current_masks(lin, [_layer_stub()])["w"], frozen)
    bake_masks(lin, [_layer_stub()])
    assert not parametrize.is_parametrized(lin) and int((lin.weight == 0).sum()) == 2


# ------------------------------------------------------------------------------------------ objective
def test_base_decayed_kl_equals_direct_computation():
    torch.manual_seed(1)
    z_s, z_t = torch.randn(5, 7), torch.randn(5, 7) * 3
    tau, T = 8 * 0.99 ** 3, 4.0
    q = torch.softmax(z_t / T, 1)
    log_p = torch.log_softmax(z_s, 1)
    direct = (q * (torch.log(q) - log_p / tau)).sum() * T * T / 5
    torch.testing.assert_close(base_decayed_kl(z_s, z_t, tau, T), direct)
    loss = Distillation(CLASS_LOGITS, tau0=8.0, gamma=0.99, temperature=4.0)
    torch.testing.assert_close(loss([z_s], [z_t], 3), direct)
    ref = F.kl_div(F.log_softmax(z_s, 1) / tau, F.softmax(z_t / T, 1), reduction="sum") * T ** 2 / 5
    torch.testing.assert_close(loss([z_s], [z_t], 3), ref)
    assert math.isclose(default_gamma(100), 0.99) and math.isclose(default_gamma(10) ** 10, 0.99 ** 100)


def test_feature_term_adds_the_layer_outputs_distance():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4)).eval()
    student = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4))
    student.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        student[0].weight[:, :3] = 0.0  # the first layer's output moves, and so does the last one's
    batch = (torch.randn(16, 6),)
    plain = Distillation(CLASS_LOGITS, tau0=8.0, gamma=0.99, temperature=1.0)
    both = Distillation(CLASS_LOGITS, tau0=8.0, gamma=0.99, temperature=1.0, feature_weight=0.5,
                        feature_paths=["0", "2"])
    outputs = plain.forward(student, student, teacher, batch, 0)
    with torch.no_grad():
        h_s, h_t = student[0](batch[0]), teacher[0](batch[0])
        z_s, z_t = student(batch[0]), teacher(batch[0])
    layer_term = (normalised_mse([h_s], [h_t]) + normalised_mse([z_s], [z_t])) / 2
    torch.testing.assert_close(outputs, plain([z_s], [z_t], 0))
    torch.testing.assert_close(both.forward(student, student, teacher, batch, 0), outputs + 0.5 * layer_term)
    # the hooks are gone afterwards, and a zero weight taps nothing
    assert not student[0]._forward_hooks and not teacher[0]._forward_hooks  # noqa: SLF001
    assert Distillation(CLASS_LOGITS, tau0=8.0, gamma=0.99, temperature=1.0, feature_paths=["0"]).feature_paths == ()
    # the layer term alone (its path only) sends a gradient to the first layer
    student.zero_grad()
    Distillation(CLASS_LOGITS, tau0=8.0, gamma=0.99, temperature=1.0, feature_weight=1.0,
                 feature_paths=["0"]).forward(student, student, teacher, batch, 0).backward()
    assert student[0].weight.grad.abs().sum() > 0


def test_per_sample_distances_average_to_the_score_and_pair_up():
    from onnxsparse.metrics import PairedComparison, paired_improvement

    g = torch.Generator().manual_seed(0)
    signals = Signals([OutputSignal("seq", 0, "sequence", "", axis=2), OutputSignal("map", 1, "dense", ""),
                       OutputSignal("gate", 2, "binary", "")])
    teacher = [[torch.randn(4, 6, 5, generator=g), torch.randn(4, 2, 3, generator=g), torch.randn(4, 3, generator=g)]
               for _ in range(3)]
    noisy = [[t + 0.3 * torch.randn(t.shape, generator=g) for t in batch] for batch in teacher]
    measured = Agreement(signals)
    for s, t in zip(noisy, teacher):
        measured.add(s, t)
    per_sample = measured.per_sample()
    assert per_sample.shape == (12,) and float(per_sample.mean()) == pytest.approx(-measured.score)
    # closer on every sample: a clear improvement; closer on one sample alone: within the noise
    closer = Agreement(signals)
    for s, t in zip(noisy, teacher):
        closer.add([t + 0.5 * (x - t) for x, t in zip(s, t)], t)
    paired = paired_improvement(closer, measured)
    assert (paired.closer, paired.farther) == (12, 0) and paired.baseline == pytest.approx(-measured.score)
    assert paired.gain > 1.645 * paired.standard_error and paired.better(1.645, 10.0)
    one_better = Agreement(signals)
    for i, (s, t) in enumerate(zip(noisy, teacher)):
        s = [x.clone() for x in s]
        if i == 0:
            s = [torch.where(torch.arange(4).view(-1, *[1] * (x.dim() - 1)) == 0, y, x) for x, y in zip(s, t)]
        one_better.add(s, t)
    paired = paired_improvement(one_better, measured)
    assert 0 < paired.gain < 1.645 * paired.standard_error and (paired.closer, paired.farther) == (1, 0)
    assert paired.relative_gain == pytest.approx(paired.gain / paired.baseline)
    assert not paired.better(1.645, 0.5) and paired.better(1.645, paired.relative_gain * 0.9)
    same = paired_improvement(measured, measured)
    assert (same.gain, same.closer, same.farther) == (0.0, 0, 0) and not same.better(1.645, 0.0)
    # farther on average is never better, whatever the margins
    assert not PairedComparison(gain=-0.01, standard_error=0.001, baseline=0.5, closer=40, farther=12).better(0.0, 0.0)
    # closer on average through a few samples while most got farther (the PP-OCR line classifier at 0.9: 19%
    # closer, farther on 40 of 52) is the heavy tail, by either route; farther on 29 of 52 is a coin's spread
    tail = PairedComparison(gain=0.096, standard_error=0.153, baseline=0.503, closer=12, farther=40)
    assert not tail.better(1.645, 0.10) and not tail.better(0.0, 0.0)
    assert PairedComparison(gain=0.096, standard_error=0.153, baseline=0.503, closer=23, farther=29).better(1.645, 0.10)


def test_fallback_objective_for_non_logits():
    assert raw_output_kind(torch.zeros(2, 10)) == "class"
    assert raw_output_kind(torch.zeros(2, 1)) == "dense"
    assert raw_output_kind(torch.zeros(2, 10, 4)) == "dense"
    assert raw_output_kind(torch.zeros(2, 10, dtype=torch.int64)) == "dense"
    s, t = [torch.ones(2, 3), torch.zeros(4)], [torch.zeros(2, 3), torch.arange(4.0)]
    expected = (1.0 / (0 + 1e-8) + (torch.arange(4.0) ** 2).mean() / torch.arange(4.0).var(unbiased=False)) / 2
    torch.testing.assert_close(normalised_mse(s, t), expected)


# ------------------------------------------------------------------------------------------ training loop
def _toy():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4)).eval()
    student = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4))
    student.load_state_dict(teacher.state_dict())
    data = torch.randn(64, 6)

    def batches(_epoch):
        return iter([(data[i : i + 16],) for i in range(0, 64, 16)])

    return teacher, student, batches


def test_lr_schedule_warmup_and_cosine():
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 10, 1.0) == pytest.approx(0.0)


class _NanAfter(Distillation):
    def __init__(self, bad_calls):
        super().__init__(CLASS_LOGITS, tau0=8.0, gamma=0.9, temperature=4.0)
        self.calls = 0
        self.bad_calls = bad_calls

    def __call__(self, s, t, epoch):
        self.calls += 1
        loss = super().__call__(s, t, epoch)
        return loss * float("nan") if self.calls in self.bad_calls else loss


def test_nan_loss_rolls_back_then_stops():
    teacher, student, batches = _toy()
    plan = TrainPlan(iterations=8, iterations_per_epoch=4, warmup=1, lr=0.05, momentum=0.9, weight_decay=0.0)
    result = train(student, teacher, batches, _NanAfter({6}), plan, selection=None, autocast=contextlib.nullcontext)
    assert result.iterations == 8 and len(result.rollbacks) == 1 and result.rollbacks[0]["step"] == 5
    teacher, student, batches = _toy()
    with pytest.raises(OnnxSparseError, match="diverged"):
        train(student, teacher, batches, _NanAfter(set(range(1, 100))), plan, selection=None,
              autocast=contextlib.nullcontext)


def test_training_reduces_distillation_loss():
    teacher, student, batches = _toy()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.3 * torch.randn_like(p))
    selection = AgreementScorer(teacher, lambda: [b for b in batches(0)], signals=CLASS_LOGITS,
                                autocast=contextlib.nullcontext)
    before = selection(student).mean_kl
    plan = TrainPlan(iterations=60, iterations_per_epoch=4, warmup=4, lr=0.05, momentum=0.9, weight_decay=0.0)
    loss = Distillation(DENSE, tau0=8.0, gamma=0.9, temperature=4.0)  # plain matching: the NMSE fallback
    result = train(student, teacher, batches, loss, plan, selection=selection, autocast=contextlib.nullcontext)
    assert len(result.curve) == 15
    assert result.curve[-1]["loss"] < result.curve[0]["loss"]
    assert selection(student).mean_kl < before


# ------------------------------------------------------------------------------------------ end to end
TINY = dict(population=4, generations=2, parents=2, crossover=2, mutation=1, epochs=2.0, fitness_samples=32)


@pytest.mark.parametrize("keep_bn", [False, True], ids=["bn_folded", "bn_kept"])
def test_end_to_end_tiny_cnn(tmp_path, keep_bn):
    from onnxsparse.pipeline import prune

    path = tmp_path / "tiny.onnx"
    onnx.save(graphs.export_torch(graphs.tiny_cnn(), keep_bn=keep_bn), path)
    x = np.random.default_rng(0).standard_normal((96, 1, 12, 12)).astype(np.float32)
    config = PruneConfig(sparsity=0.9, batch_size=16, selection_size=16, verify_size=16, unipts=UniPTSConfig(**TINY))
    result = prune(path, tmp_path / "out.onnx", {"input": x}, config, progress=False)
    report = result.report
    assert report["verification"]["export_max_rel_error"] < 1e-3
    info = report["method_info"]
    assert info["allocation"]["ran"] and len(info["allocation"]["history"]) == 2
    assert set(info["allocation"]["candidates"]) == {"uniform", "global-magnitude", "search"}
    assert info["training"]["iterations"] == 8 and len(info["training"]["curve"]) == 2
    assert info["training"]["loss"].startswith("base-decayed KL")
    total = sum(row["params"] for row in result.layers)
    assert sum(row["target_zeros"] for row in result.layers) == round(0.9 * total)
    assert info["kept"] in ("trained", "start")
    for row in result.layers:  # exactly the allotted zeros (trained kept weights are never exactly 0)
        if info["kept"] == "trained":
            assert row["zeros"] == row["target_zeros"], row
        else:  # a reconstructed start may hold exact zeros beyond the allotted ones (dead inputs)
            assert row["zeros"] >= row["target_zeros"], row
    if info["kept"] == "trained":
        assert result.achieved_sparsity == pytest.approx(round(0.9 * total) / total)
    starts = set(info["start"]["candidates"])
    assert {"magnitude+correction", "reconstruct"} <= starts
    assert starts <= {"magnitude+correction", "reconstruct", "reconstruct, uniform allocation"}
    assert info["start"]["chosen"] in starts
    correction = info["start"]["correction"]
    if keep_bn:  # every BatchNorm mode was scored on the selection, and the best one kept
        assert set(correction["scores"]) == {"none", "channel", "relative", "reestimate"}
        assert correction["scores"][correction["chosen"]] == max(correction["scores"].values())
        if correction["chosen"] in ("relative", "reestimate"):
            assert correction["batchnorm_reestimated"] == 3
    else:
        assert set(correction["scores"]) == {"none", "channel"}


def test_same_seed_same_result(tmp_path):
    from onnxsparse.pipeline import prune

    path = tmp_path / "tiny.onnx"
    onnx.save(graphs.export_torch(graphs.tiny_cnn()), path)
    x = np.random.default_rng(0).standard_normal((48, 1, 12, 12)).astype(np.float32)
    config = PruneConfig(sparsity=0.7, batch_size=16, selection_size=16, unipts=UniPTSConfig(**{**TINY, "epochs": 1.0}))
    runs = []
    for name in ("a.onnx", "b.onnx"):
        prune(path, tmp_path / name, {"input": x}, config, progress=False)
        runs.append(onnx.load(tmp_path / name))
    for a, b in zip(runs[0].graph.initializer, runs[1].graph.initializer):
        assert a.SerializeToString() == b.SerializeToString()


def test_end_to_end_non_logit_output_uses_normalised_mse(tmp_path):
    from onnxsparse.pipeline import prune

    path = tmp_path / "conv.onnx"
    onnx.save(graphs.conv_bn_relu(), path)
    x = np.random.default_rng(0).standard_normal((48, 3, 8, 8)).astype(np.float32)
    config = PruneConfig(sparsity=0.5, batch_size=16, selection_size=16, unipts=UniPTSConfig(**{**TINY, "epochs": 1.0}))
    result = prune(path, None, {"x": x}, config, progress=False)
    info = result.report["method_info"]
    assert info["training"]["loss"].startswith("normalised MSE") and not info["training"]["logits"]
    assert "nmse" in info["allocation"]["candidates"]["uniform"]
    assert all(row["zeros"] >= row["target_zeros"] for row in result.layers)
    assert result.report["verification"]["export_max_rel_error"] < 1e-3


def test_paper_preset_is_the_official_recipe():
    paper = UniPTSConfig.paper()
    assert (paper.population, paper.generations, paper.parents, paper.crossover, paper.mutation) == (25, 25, 10, 12, 12)
    assert (paper.epochs, paper.lr, paper.temperature, paper.tau0, paper.pruned_decay) == (100.0, 0.01, 4.0, 8.0, 5e-5)
    assert paper.augment and paper.batchnorm == "train"
    quick = UniPTSConfig()
    assert quick.crossover + quick.mutation < quick.population  # every generation has random children too
    assert not quick.augment


def test_end_to_end_2_4_pattern(tmp_path):
    from onnxsparse.pipeline import prune

    path = tmp_path / "tiny.onnx"
    onnx.save(graphs.export_torch(graphs.tiny_cnn()), path)
    x = np.random.default_rng(0).standard_normal((48, 1, 12, 12)).astype(np.float32)
    config = PruneConfig(sparsity=0.5, batch_size=16, pattern="2:4", selection_size=16,
                         unipts=UniPTSConfig(**{**TINY, "epochs": 1.0}))
    result = prune(path, tmp_path / "out.onnx", {"input": x}, config, progress=False)
    info = result.report["method_info"]["allocation"]
    assert not info["ran"] and info["chosen"] == "pattern" and info["pattern"] == "2:4"
    assert len(info["dense_layers"]) == 1  # the stem conv has one input channel
    for row in result.layers:
        if row["name"] in info["dense_layers"]:
            assert row["zeros"] == 0
        else:  # half allotted; a reconstructed start may zero a kept weight too (an input that is always 0)
            assert row["target_zeros"] == row["params"] // 2 <= row["zeros"] and row["nm"] == "2:4"
    assert result.report["verification"]["export_max_rel_error"] < 1e-3


@pytest.mark.slow
def test_augmentation_on_image_folders_measures_the_flip(tmp_path):
    from PIL import Image

    from onnxsparse.methods.unipts.flip import FLIP_AGREEMENT
    from onnxsparse.pipeline import prune

    path = tmp_path / "tiny.onnx"
    onnx.save(graphs.export_torch(graphs.tiny_cnn()), path)
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(64):
        Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8), mode="L").save(folder / f"{i}.png")
    seen = {}
    for augment in (False, True):
        config = PruneConfig(sparsity=0.7, batch_size=16, selection_size=16,
                             unipts=UniPTSConfig(**{**TINY, "augment": augment}))
        result = prune(path, tmp_path / f"{augment}.onnx", folder, config, progress=False)
        seen[augment] = result.report["method_info"]["training"]
    assert seen[False]["augment"] is False and seen[False]["flip"] is False and seen[False]["flip_agreement"] is None
    on = seen[True]
    assert on["augment"] is True and 0.0 <= on["flip_agreement"] <= 1.0
    assert on["flip"] == (on["flip_agreement"] >= FLIP_AGREEMENT)


def test_work_plan_is_counted_not_timed():
    from onnxsparse.methods.unipts.plan import MAX_EPOCHS, WORK_BUDGETS, plan_work

    def plan(macs, mode="none", **kw):
        args = dict(n_train=800, batch_size=64, fitness_samples=256, population=12, generations=8, mode=mode,
                    search=True)
        return plan_work(macs, macs // 100, **{**args, **kw})

    small = plan(10_000_000)
    assert small.generations == 8 and small.iterations == MAX_EPOCHS * 12 and small.reason == ""
    assert plan(10_000_000) == small  # the same counts give the same plan, on any machine
    big = plan(150_000_000)
    assert 0 < big.generations < 8 and big.iterations < small.iterations
    assert big.search_work + big.training_work <= WORK_BUDGETS["cpu"] == big.work_budget
    assert plan(150_000_000, device_type="cuda").iterations > big.iterations  # a budget per device type
    assert "search generations fit" in big.reason and "epochs fit the work budget" in big.reason
    costly = plan(150_000_000, mode="relative")
    assert costly.generations < big.generations  # a correction mode that costs more passes buys fewer candidates
    huge = plan(100_000_000_000)
    assert huge.generations == 0 and huge.iterations == huge.iterations_per_epoch  # never less than one epoch
    assert plan(10_000_000, search=False).generations == 0


def test_time_budget_is_a_cap_that_says_it_cut():
    from onnxsparse.distributed import DistContext
    from onnxsparse.methods.unipts.dst import _Budget

    def decide(budget_s, total=40):
        budget = _Budget(budget_s, time.perf_counter(), torch.device("cpu"), DistContext())
        for step in range(1, 12):
            new = budget.total_after(step, total)
            if new != total:
                return new
        return total

    assert decide(None) == 40 and decide(1e6) == 40  # no cap, or one with room: the plan as counted
    assert 10 <= decide(1e-6) < 40  # no time left: shortened


@pytest.mark.slow
def test_quick_recipe_gives_the_same_bytes_under_load(tmp_path):
    """The default plan reads no clock: two runs of the same command, one beside CPU-burning processes, write
    byte-identical models."""
    import subprocess
    import sys

    from onnxsparse.pipeline import prune

    path = tmp_path / "tiny.onnx"
    onnx.save(graphs.export_torch(graphs.tiny_cnn(), keep_bn=True), path)
    x = np.random.default_rng(0).standard_normal((160, 1, 12, 12)).astype(np.float32)
    tiny = {k: v for k, v in TINY.items() if k != "epochs"}  # the recipe's own plan
    config = PruneConfig(sparsity=0.8, batch_size=16, device="cpu", unipts=UniPTSConfig(**tiny))
    quiet = prune(path, tmp_path / "quiet.onnx", {"input": x}, config, progress=False).report["method_info"]
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(3)]
    try:
        loaded = prune(path, tmp_path / "loaded.onnx", {"input": x}, config, progress=False).report["method_info"]
    finally:
        for b in burners:
            b.kill()
            b.wait()
    assert (tmp_path / "quiet.onnx").read_bytes() == (tmp_path / "loaded.onnx").read_bytes()
    assert quiet["allocation"]["plan"] == loaded["allocation"]["plan"]
    assert quiet["training"]["iterations"] == quiet["allocation"]["plan"]["iterations"]
    assert not quiet["training"]["cut_by_time_budget"]
