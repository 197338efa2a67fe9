"""Real signals on a real process: Ctrl-C / SIGTERM mid-run leave no output and say where they stopped;
two runs side by side do not interfere."""

from __future__ import annotations

import json
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


# The CLI started as a background job of a non-interactive shell (``cmd &`` in a script) inherits SIGINT ignored.
CLI_SIGINT_IGNORED = [sys.executable, "-c", "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                      "from onnxsparse_cli.main import main; main()"]


def _short_run(model: Path, calib: Path, out: Path) -> list[str]:
    return [*CLI_SIGINT_IGNORED, "prune", str(model), "--sparsity", "0.9", "--calib", str(calib), "-o", str(out),
            "-v", "--method", "unipts", "--no-search", "--iterations", "40", "--batch-size", "8"]


def test_sigint_stops_a_run_started_with_sigint_ignored(tmp_path):
    """Python leaves an inherited SIG_IGN for SIGINT in place; the CLI must install its handler regardless."""
    model, calib = _setup(tmp_path)
    out = tmp_path / "out" / "sparse.onnx"
    out.parent.mkdir()
    proc = subprocess.Popen(_short_run(model, calib, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = _Output(proc)
    try:
        output.wait_for(lambda text: "method unipts at sparsity" in text, "the method phase's log line")
    except BaseException:
        proc.kill()
        raise
    proc.send_signal(signal.SIGINT)
    _wait_exit(proc, "the run to exit after SIGINT")
    text = output.finish()
    assert proc.returncode == 130, text
    assert "no output was written" in text
    assert list(out.parent.iterdir()) == []


@pytest.mark.slow
def test_signal_at_every_output_line(tmp_path):
    """SIGINT and SIGTERM sent right after each line a short run prints (log lines, announcements, summary):
    through the method phase the run stops with status 130 and leaves nothing; later, either that or, once the
    output's atomic rename is done, a complete model and no claim that nothing was written. SIGINT starts
    ignored, as in a background job (tests/signal_walk.py runs the jobs)."""
    model, calib = _setup(tmp_path)
    root = tmp_path / "runs"
    root.mkdir()
    args = ["prune", str(model), "--sparsity", "0.9", "--calib", str(calib), "-o", "{out}", "-v", "--method",
            "unipts", "--no-search", "--iterations", "40", "--batch-size", "8"]
    spec = tmp_path / "walk.json"
    spec.write_text(json.dumps({"argv": args, "root": str(root), "signals": ["SIGINT", "SIGTERM"], "parallel": 3}))
    walked = subprocess.run([sys.executable, str(Path(__file__).with_name("signal_walk.py")), str(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=BOUND_S)
    assert walked.returncode == 0, walked.stderr[-3000:]
    reference, *results, _seconds = [json.loads(row) for row in walked.stdout.splitlines()]
    assert reference["status"] == 0 and reference["left"] == ["sparse.onnx"], reference["output"]
    lines = reference["output"].split("\n")[:-1]
    method_ends = next(i for i, text in enumerate(lines) if "onnxsparse.exporter" in text) - 1
    assert 3 < method_ends < len(lines) - 3, reference["output"]
    assert len(results) == 2 * len(lines), walked.stdout[-3000:]
    for r in results:
        line, text, left = r["line"], r["output"], r["left"]
        if not r["sent"]:  # this run printed fewer lines than the reference: it finished
            assert r["status"] == 0 and left == ["sparse.onnx"] and line > method_ends, text[-3000:]
            continue
        where = f"{r['signal']} after line {line} ({lines[line][-120:]!r}): status {r['status']}\n{text[-3000:]}"
        assert "Traceback" not in text, where
        assert all(not name.startswith(".") for name in left), where  # no temporary file beside the output
        if left:  # the signal came after the atomic rename: the model there is complete
            # through the method phase's last line the export and verification still lie ahead, far longer
            # than a signal takes to arrive: the run must have stopped
            assert line > method_ends, where
            assert left == ["sparse.onnx"], where
            onnx.checker.check_model(onnx.load(str(root / f"{line}-{r['signal']}" / left[0])))
            assert "no output was written" not in text, where
        else:
            assert r["status"] == 130, where
            assert "no output was written" in text, where
