"""Real signals on a real process: Ctrl-C / SIGTERM mid-run leave no output and say where they stopped;
two runs side by side do not interfere."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

import graphs

CLI = [sys.executable, "-c", "from onnxsparse_cli.main import main; main()"]

# How long a wait for a run's next event may take: generous, for a loaded 2-core machine. A run that stops
# earlier fails at once; only a hung one waits this long.
BOUND_S = 600.0


class _Output:
    """A process's stdout, read on a thread (the process never blocks on a full pipe) and waited on."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.text = ""
        self.closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._drain, args=(proc.stdout,), daemon=True)
        self._thread.start()

    def _drain(self, stream) -> None:
        for chunk in iter(lambda: os.read(stream.fileno(), 4096), b""):
            with self._changed:
                self.text += chunk.decode("utf-8", errors="replace")
                self._changed.notify_all()
        with self._changed:
            self.closed = True
            self._changed.notify_all()

    def wait_for(self, found, what: str) -> None:
        """Wait until ``found(text)`` holds; fail naming ``what`` if the output ends or BOUND_S passes first."""
        with self._changed:
            self._changed.wait_for(lambda: found(self.text) or self.closed, timeout=BOUND_S)
            if not found(self.text):
                reason = "the output ended" if self.closed else f"{BOUND_S:.0f} s passed"
                pytest.fail(f"waited for {what}, but {reason} first; output so far:\n{self.text[-3000:]}")

    def finish(self) -> str:
        self._thread.join(timeout=BOUND_S)
        return self.text


def _wait_exit(proc: subprocess.Popen, what: str) -> None:
    try:
        proc.wait(timeout=BOUND_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"waited {BOUND_S:.0f} s for {what}")


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
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    output = _Output(proc)
    phase_line = "method unipts at sparsity"
    try:
        output.wait_for(lambda text: phase_line in text, f"the log line {phase_line!r} (the method phase starts)")
        # Anything printed on the lines after it (the training progress bar) comes from inside the method phase.
        output.wait_for(lambda text: text.split(phase_line, 1)[1].partition("\n")[2].strip(),
                        "output after the method phase's log line (its progress bar)")
    except BaseException:
        proc.kill()
        raise
    sent = time.monotonic()
    proc.send_signal(sig)
    _wait_exit(proc, f"the run to exit after signal {sig.name}")
    stopped_in = time.monotonic() - sent
    output = output.finish()
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
        text, _ = proc.communicate(timeout=BOUND_S)
        assert proc.returncode == 0, text
        assert text.strip().splitlines()[-1].startswith("PASSED")
        assert out.is_file()
    a, b = (onnx.load(str(out)) for out, _ in jobs)
    assert a.graph.initializer[0].raw_data != b.graph.initializer[0].raw_data  # each wrote its own model
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []
