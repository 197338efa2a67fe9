"""Real signals on a real process: Ctrl-C / SIGTERM mid-run leave no output and say where they stopped;
two runs side by side do not interfere."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

import graphs

CLI = [sys.executable, "-c", "from onnxsparse_cli.main import main; main()"]


def _setup(tmp_path: Path, n: int = 64, seed: int = 0) -> tuple[Path, Path]:
    model = tmp_path / f"m{seed}.onnx"
    onnx.save(graphs.export_torch(graphs.tiny_cnn(seed)), str(model))
    calib = tmp_path / f"calib{seed}.npy"
    np.save(calib, np.random.default_rng(seed).standard_normal((n, 1, 12, 12)).astype(np.float32))
    return model, calib


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_run_leaves_no_output(tmp_path, sig):
    model, calib = _setup(tmp_path)
    out = tmp_path / "out" / "sparse.onnx"
    out.parent.mkdir()
    # A long UniPTS training run, so the signal lands in the middle of the method phase.
    proc = subprocess.Popen(
        [*CLI, "prune", str(model), "--sparsity", "0.9", "--calib", str(calib), "-o", str(out), "-v",
         "--method", "unipts", "--no-search", "--iterations", "100000", "--batch-size", "8"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines = []
    deadline = time.monotonic() + 120
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if "method unipts at sparsity" in line or time.monotonic() > deadline:
            break
    time.sleep(2.0)
    sent = time.monotonic()
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=60)
    stopped_in = time.monotonic() - sent
    output = "".join(lines) + rest
    assert proc.returncode == 130, output
    assert "interrupted during method; no output was written" in output
    assert "Traceback" not in output
    assert stopped_in < 15, f"took {stopped_in:.1f}s to stop"
    assert list(out.parent.iterdir()) == []


def test_two_runs_side_by_side_do_not_interfere(tmp_path):
    jobs = []
    for seed in (0, 1):
        model, calib = _setup(tmp_path, seed=seed)
        out = tmp_path / f"sparse{seed}.onnx"
        jobs.append((out, subprocess.Popen(
            [*CLI, "prune", str(model), "--sparsity", "0.5", "--calib", str(calib), "-o", str(out), "-q",
             "--method", "global-magnitude", "--seed", str(seed)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )))
    for out, proc in jobs:
        text, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, text
        assert text.strip().splitlines()[-1].startswith("PASSED")
        assert out.is_file()
    a, b = (onnx.load(str(out)) for out, _ in jobs)
    assert a.graph.initializer[0].raw_data != b.graph.initializer[0].raw_data  # each wrote its own model
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []
