"""The device-side pieces of the training loop (kthvalue masks, resident/prefetched batches, OOM messages)
and onnxruntime's provider choice; CUDA-only checks skip without a GPU."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import graphs
from onnxsparse import PruneConfig, prune
from onnxsparse.config import UniPTSConfig
from onnxsparse.data.calibration_set import CalibrationSet
from onnxsparse.errors import OnnxSparseError
from onnxsparse.exporter.verify import ort_device, ort_providers, ort_session
from onnxsparse.methods.unipts.feed import prefetch
from onnxsparse.sparsity.masks import magnitude_mask, zeros_for


def _argsort_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    flat = torch.ones(weight.numel(), dtype=torch.bool)
    flat[torch.argsort(weight.abs().flatten(), stable=True)[: zeros_for(sparsity, weight.numel())]] = False
    return flat.view_as(weight)


def test_kthvalue_mask_is_the_stable_argsort_mask_with_ties():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(1, 120, (1,), generator=g))
        w = torch.randint(-3, 4, (n,), generator=g).float().view(n, 1)  # many ties, zeros among them
        for s in (0.0, 0.25, 0.5, 0.9, 1.0, float(torch.rand(1, generator=g))):
            mask = magnitude_mask(w, s)
            assert torch.equal(mask, _argsort_mask(w, s)), (w.flatten().tolist(), s)
            assert int((~mask).sum()) == zeros_for(s, n)


def _calib(n: int = 20) -> CalibrationSet:
    rng = np.random.default_rng(0)
    train = {"x": rng.standard_normal((n, 3, 8, 8)).astype(np.float32)}
    selection = {"x": rng.standard_normal((4, 3, 8, 8)).astype(np.float32)}
    return CalibrationSet(train, selection, ("x",), True, {}, {}, layouts={"x": "nchw"})


@pytest.mark.parametrize("world_size", [1, 2])
def test_resident_batches_equal_host_batches(world_size):
    calib = _calib()
    resident = calib.resident("train", "cpu", 1 << 30)
    assert resident is not None and calib.resident("train", "cpu", 16) is None
    for rank in range(world_size):
        kw = dict(shuffle=True, seed=3, augment=True, drop_last=True, rank=rank, world_size=world_size)
        host = list(calib.batches("train", 4, **kw))
        dev = list(calib.batches("train", 4, resident=resident, **kw))
        assert len(host) == len(dev) > 0
        for a, b in zip(host, dev):
            assert torch.equal(a[0], b[0])


def test_prefetch_keeps_order_raises_and_stops_early():
    assert list(prefetch(iter(range(50)), 2)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        list(prefetch(failing(), 2))
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    it = prefetch(endless(), 2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()  # the producer thread stops instead of running on
    seen = len(produced)
    assert seen <= 3 + 2 + 2


def test_ort_providers_and_cpu_fallback(caplog):
    assert ort_providers("cpu") == ["CPUExecutionProvider"]
    with caplog.at_level(logging.INFO, logger="onnxsparse.exporter.verify"):
        assert ort_providers("cuda:1", available=["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert "no CUDAExecutionProvider" in caplog.text
    assert ort_providers("cuda:1", available=["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        ("CUDAExecutionProvider", {"device_id": 1, "use_tf32": 0}), "CPUExecutionProvider"]
    assert ort_device("cpu") == "cpu" and ort_device("cuda:2") == "cuda:2"
    with pytest.raises(OnnxSparseError, match="--device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        ort_device("gpu")
    model = graphs.export_torch(graphs.tiny_cnn())
    session = ort_session(model, "cuda" if "CUDAExecutionProvider" not in ort_providers("cuda") else "cpu")
    assert session.get_providers()[-1] == "CPUExecutionProvider"


@pytest.mark.parametrize("phase,flag", [("training", "--batch-size 16"),
                                        ("statistics correction", "--correction-samples 32")])
def test_out_of_memory_names_phase_and_flag(tmp_path, monkeypatch, phase, flag):
    import onnxsparse.methods.unipts.evaluator as evaluator
    import onnxsparse.methods.unipts.method as method

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    if phase == "training":
        monkeypatch.setattr(method, "train", oom)
    else:
        monkeypatch.setattr(evaluator, "apply_correction", oom)
    feeds = [{"input": np.random.default_rng(0).standard_normal((8, 1, 12, 12)).astype(np.float32)}
             for _ in range(4)]
    config = PruneConfig(sparsity=0.5, device="cpu", batch_size=16, correction_samples=32, selection_size=8,
                         unipts=UniPTSConfig(search=False, iterations=2))
    with pytest.raises(OnnxSparseError, match=f"out of memory on cpu during {phase} with {flag} per batch; "
                                              f"lower {flag.split()[0]}"):
        prune(graphs.export_torch(graphs.tiny_cnn()), tmp_path / "o.onnx", feeds, config, progress=False)


@pytest.mark.cuda
def test_cuda_prune_verifies_on_cuda_provider_or_falls_back(tmp_path):
    feeds = [{"input": np.random.default_rng(0).standard_normal((16, 1, 12, 12)).astype(np.float32)}
             for _ in range(4)]
    config = PruneConfig(sparsity=0.5, device="cuda", batch_size=16, selection_size=16,
                         unipts=UniPTSConfig(generations=2, population=6, iterations=8))
    result = prune(graphs.export_torch(graphs.tiny_cnn()), tmp_path / "o.onnx", feeds, config, progress=False)
    assert result.report["device"].startswith("cuda")
    # at least the allotted zeros: a reconstructed start may zero a kept weight too (an input that is always 0)
    assert all(row["zeros"] >= row["target_zeros"] for row in result.layers)
    assert result.report["verification"]["export_max_rel_error"] <= config.verify_tolerance
