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


def test_failure_log_names_each_failure_as_it_happens(tmp_path):
    """gpu_check.sh's record of failures: written by tests/conftest.py while the suite runs, not at its end."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    shutil.copy(Path(__file__).parent / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_two.py").write_text(
        "def test_passes():\n    assert True\n\n\ndef test_fails():\n    assert 1 == 2, 'one is not two'\n")
    log = tmp_path / "failures.log"
    env = {**os.environ, "ONNXSPARSE_FAILURE_LOG": str(log)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1
    text = log.read_text()
    assert "FAILED test_two.py::test_fails (call)" in text and "one is not two" in text
    assert "test_passes" not in text
