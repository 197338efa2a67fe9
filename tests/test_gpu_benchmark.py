"""benchmarks/gpu.py end to end at its CPU size (tiny ResNet-50-style and ViT models at 32 px)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_gpu_benchmark_small_on_cpu(tmp_path, capsys, monkeypatch):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_gpu", bench)
    spec.loader.exec_module(bench)
    out_json = tmp_path / "gpu.json"
    assert bench.main(["--small", "--device", "cpu", "--gpus", "1", "--iterations", "2",
                       "--recipes", "paper", "--calib-images", "32", "--json", str(out_json)]) == 0
    rows = json.loads(out_json.read_text())
    assert [(r["model"], r["recipe"]) for r in rows] == [("resnet50", "paper"), ("vit_b_16", "paper")]
    for row in rows:
        assert row["device"] == "cpu" and row["processes"] == 1 and row["peak_gpu_gib"] is None
        assert row["search_images_per_s"] > 0 and row["train_images_per_s"] > 0
        assert row["train_iterations"] == 2 and row["candidates_scored"] >= 3
        assert {"allocation", "start", "training", "total"} <= set(row["phases_s"])
        # at least the target; a kept reconstructed start may hold a few exact zeros beyond it (dead inputs)
        assert 0.9 - 1e-4 <= row["achieved_sparsity"] <= 0.9 + 1e-2
        assert row["projected_paper_hours"] == pytest.approx(row["projected_search_hours"]
                                                             + row["projected_train_hours"], abs=0.02)
    assert "| resnet50 | paper | 1 | cpu |" in capsys.readouterr().out
