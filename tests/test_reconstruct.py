"""The layer-wise reconstruction method (SparseGPT-style with an exact re-fit)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphs
from onnxsparse.config import METHODS, PruneConfig
from onnxsparse.methods import available_methods
from onnxsparse.methods.reconstruct import _canonical, _columns, _refit, _sparsegpt, _Unfold, _block_quotas
from onnxsparse.pipeline import prune
from onnxsparse.sparsity.masks import magnitude_mask, zeros_for


def test_registered():
    assert "reconstruct" in available_methods() and "reconstruct" in METHODS


@pytest.mark.parametrize(
    ("conv", "shape"),
    [
        (nn.Conv2d(6, 4, 3, stride=2, padding=1, dilation=1, groups=2), (2, 6, 7, 9)),
        (nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4), (2, 4, 6, 6)),
        (nn.Conv1d(3, 5, 3, stride=1, padding=1), (2, 3, 11)),
        (nn.Conv2d(6, 4, 1, groups=2), (2, 6, 5, 7)),  # pointwise: no im2col
    ],
)
def test_columns_reproduce_the_convolution(conv, shape):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    k = tuple(conv.kernel_size)
    plan = _Unfold("conv", conv.groups, k, tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation))
    cols = _columns(x, plan, None).double()  # (G, d, N*L)
    W = _canonical(conv.weight, plan)  # (G, R, d)
    y = (W @ cols)  # (G, R, N*L)
    ref = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups) if x.dim() == 4 else \
        F.conv1d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    n = shape[0]
    ref = ref.reshape(n, conv.groups, conv.out_channels // conv.groups, -1).permute(1, 2, 0, 3).reshape(y.shape)
    assert torch.allclose(y, ref.double(), atol=1e-5)


def test_block_quotas_are_exact():
    assert sum(_block_quotas(200, [128, 128, 37])) == 200 and _block_quotas(293, [128, 128, 37]) == [128, 128, 37]
    assert _block_quotas(0, [5, 5]) == [0, 0]


def test_identity_hessian_is_magnitude_pruning():
    torch.manual_seed(0)
    W = torch.randn(1, 8, 64, dtype=torch.float64)
    H = torch.eye(64, dtype=torch.float64).unsqueeze(0)
    zeros = zeros_for(0.6, W.numel())
    pruned, keep = _sparsegpt(W, H, 64, zeros, None)
    assert int((~keep).sum()) == zeros
    assert torch.equal(keep[0], magnitude_mask(W[0], 0.6))
    assert torch.equal(pruned, W * keep)  # no compensation without correlations


def test_sparsegpt_and_refit_lower_the_layer_error():
    torch.manual_seed(1)
    # activations-like inputs: a few shared factors plus noise, features at different scales
    X = torch.randn(96, 10, dtype=torch.float64) @ torch.randn(10, 4000, dtype=torch.float64)
    X = (X + 0.3 * torch.randn(96, 4000, dtype=torch.float64)) * 3 * torch.rand(96, 1, dtype=torch.float64)
    H = (X @ X.T).unsqueeze(0)
    Hd = H + 0.01 * torch.diagonal(H, dim1=1, dim2=2).mean() * torch.eye(96, dtype=torch.float64)
    W = torch.randn(1, 16, 96, dtype=torch.float64)
    zeros = zeros_for(0.7, W.numel())

    def err(w):
        d = w - W
        return float(torch.einsum("grd,gde,gre->", d, H, d))

    pruned, keep = _sparsegpt(W, Hd, 96, zeros, None)
    assert int((~keep).sum()) == zeros and bool((pruned[~keep] == 0).all())
    refit = _refit(W, Hd, keep)
    assert bool((refit[~keep] == 0).all())
    magnitude = W * magnitude_mask(W, 0.7)
    assert err(refit) <= err(pruned) * (1 + 1e-9) < 0.2 * err(magnitude)
    assert err(refit) < err(_refit(W, Hd, magnitude_mask(W, 0.7)))  # the OBS mask beats the magnitude mask
    # the re-fit is the exact constrained optimum: the gradient on kept weights vanishes
    grad = (refit - W) @ Hd[0]
    assert float(grad[keep].abs().max()) < 1e-6 * float((W @ Hd[0]).abs().max())


def test_refit_solves_wide_layers_with_several_threads():
    """512 inputs per output, two threads: torch 2.14.1's batched LU (torch.linalg.solve) failed here on the CPU
    (MKL DLASWP), and the layer fell back to magnitude pruning; solved one system at a time, it is the constrained
    optimum, equal to the single-threaded batched solve."""
    torch.manual_seed(2)
    D = 512
    X = torch.randn(D, 2 * D, dtype=torch.float64)
    Hd = (X @ X.T / D + 0.01 * torch.eye(D, dtype=torch.float64)).unsqueeze(0)
    W = torch.randn(1, 40, D, dtype=torch.float64)
    keep = magnitude_mask(W, 0.5)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        refit = _refit(W, Hd, keep)
    finally:
        torch.set_num_threads(threads)
    assert bool((refit[~keep] == 0).all())
    grad = (refit - W) @ Hd[0]  # vanishes on the kept weights at the optimum
    assert float(grad[keep].abs().max()) < 1e-8 * float((W @ Hd[0]).abs().max())
    m = keep[0].double()  # the same systems, one batched LU on one thread (where it works)
    A = m.unsqueeze(2) * Hd[0] * m.unsqueeze(1) + (1 - m).unsqueeze(2) * torch.eye(D, dtype=torch.float64)
    torch.set_num_threads(1)
    try:
        single = torch.linalg.solve(A, (m * (W[0] @ Hd[0])).unsqueeze(2)).squeeze(2) * m
    finally:
        torch.set_num_threads(threads)
    assert torch.allclose(refit[0], single, rtol=0, atol=1e-12 * float(single.abs().max()))


def _correlated(n: int, shape: tuple[int, ...], rank: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    features = shape[-1]
    basis = rng.standard_normal((rank, features))
    z = rng.standard_normal((n, *shape[:-1], rank))
    return (z @ basis + 0.05 * rng.standard_normal((n, *shape))).astype(np.float32)


def _output_error(dense: onnx.ModelProto, sparse_path, x: np.ndarray) -> float:
    a = ort.InferenceSession(dense.SerializeToString(), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(sparse_path), providers=["CPUExecutionProvider"])
    name = a.get_inputs()[0].name
    ya, yb = a.run(None, {name: x})[0], b.run(None, {name: x})[0]
    return float(((ya - yb) ** 2).mean() / (ya ** 2).mean())


@pytest.mark.parametrize(
    ("model", "shape"),
    [(graphs.matmul(weight_first=False), (4, 10)), (graphs.gemm(trans_b=1), (10,))],
    ids=["matmul+add", "gemm-linear"],
)
def test_reconstruct_beats_magnitude_on_correlated_inputs(tmp_path, model, shape):
    x = _correlated(256, shape, rank=3)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    errors = {}
    for method in ("magnitude", "reconstruct"):
        out = tmp_path / f"{method}.onnx"
        result = prune(path, out, {"x": x}, PruneConfig(sparsity=0.5, method=method, correction=False),
                       progress=False)
        assert result.achieved_sparsity >= 0.5
        errors[method] = _output_error(model, out, x)
        if method == "reconstruct":
            info = result.report["method_info"]
            assert info["fitted_layers"] == 1 and not info["magnitude_layers"]
    assert errors["reconstruct"] < 0.1 * errors["magnitude"], errors


def test_reconstruct_grouped_convs_and_bn_model(tmp_path):
    rng = np.random.default_rng(0)
    cases = [(graphs.grouped_convs(), rng.standard_normal((96, 8, 6, 6)).astype(np.float32)),
             (graphs.export_torch(graphs.tiny_cnn(), keep_bn=True), rng.standard_normal((96, 1, 12, 12)).astype(np.float32))]
    for i, (model, x) in enumerate(cases):
        path = tmp_path / f"g{i}.onnx"
        onnx.save(model, str(path))
        errors = {}
        for method in ("magnitude", "reconstruct"):
            out = tmp_path / f"g{i}_{method}.onnx"
            result = prune(path, out, x, PruneConfig(sparsity=0.6, method=method), progress=False)
            for row in result.layers:
                assert row["zeros"] >= row["target_zeros"] == zeros_for(0.6, row["params"])
            errors[method] = _output_error(model, out, x)
            if method == "reconstruct":
                info = result.report["method_info"]
                assert info["fitted_layers"] == len(result.layers) and not info["magnitude_layers"], info
        assert errors["reconstruct"] < errors["magnitude"], errors


def test_sparsity_zero_keeps_the_function(tmp_path):
    model = graphs.export_torch(graphs.tiny_cnn())
    path = tmp_path / "t.onnx"
    onnx.save(model, str(path))
    x = np.random.default_rng(3).standard_normal((64, 1, 12, 12)).astype(np.float32)
    prune(path, tmp_path / "o.onnx", x, PruneConfig(sparsity=0.0, method="reconstruct", correction=False),
          progress=False)
    assert _output_error(model, tmp_path / "o.onnx", x) < 1e-6


def test_conv_transpose_falls_back_to_magnitude(tmp_path):
    path = tmp_path / "ct.onnx"
    onnx.save(graphs.conv_transpose(), str(path))
    x = np.random.default_rng(0).standard_normal((16, 4, 5, 5)).astype(np.float32)
    result = prune(path, tmp_path / "o.onnx", x, PruneConfig(sparsity=0.5, method="reconstruct"), progress=False)
    (fallback,) = result.report["method_info"]["magnitude_layers"]
    assert "not supported" in fallback["reason"] and result.achieved_sparsity == pytest.approx(0.5, abs=1e-2)


def test_sampled_positions_match_unfold():
    torch.manual_seed(0)
    for kernel, stride, padding, dilation, groups, shape in [
        ((3, 3), (2, 2), (1, 1), (1, 1), 2, (2, 6, 9, 11)),
        ((3, 3), (1, 1), (2, 2), (2, 2), 1, (2, 4, 8, 8)),
        ((1, 5), (1, 1), (0, 2), (1, 1), 1, (2, 3, 1, 13)),
    ]:
        x = torch.randn(*shape)
        plan = _Unfold("conv", groups, kernel, stride, padding, dilation)
        full = _columns(x, plan, None)
        positions = full.shape[2] // shape[0]
        index = torch.randperm(positions)[:5].sort().values
        ref = full.reshape(*full.shape[:2], shape[0], positions)[:, :, :, index].reshape(*full.shape[:2], -1)
        assert torch.equal(_columns(x, plan, index), ref)
