"""Runs the CLI once per (line, signal) job and sends the signal right after that output line appears.

Used by tests/test_interrupt.py as a script: ``python signal_walk.py SPEC_JSON``, where the file holds
``{"argv": [...CLI arguments, "{out}" for the output path...], "root": folder, "signals": ["SIGINT", ...],
"parallel": n}``. A first run without a signal gives the lines; then every (line, signal) pair runs in a folder
``root/<line>-<signal>``. Prints one JSON object per run (the first with line null): line, signal, status,
output, the files left in its folder.

The CLI is imported once here and every run is a forked child (a real process receiving a real signal from
this one), so a walk over every line of a run costs a fraction of a fresh interpreter per run. Each child
starts with SIGINT ignored, as a background job of a non-interactive shell does.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import sys
import time

import onnx2torch  # noqa: F401 - imported before forking: each child would import it otherwise
import onnxruntime  # noqa: F401

import onnxsparse.pipeline  # noqa: F401
from onnxsparse_cli.main import main


def _child(argv: list[str], write_fd: int) -> None:
    os.dup2(write_fd, 1)
    os.dup2(write_fd, 2)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.argv = ["onnxsparse", *argv]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:  # a signal after the command returned (the CLI's handlers are behind us)
        code = 130
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001 - the exit status is all that matters now
                pass
        os._exit(code)


def walk(spec: dict) -> None:
    root = spec["root"]
    reference = os.path.join(root, "reference")
    os.mkdir(reference)
    (first,) = _run(spec, [[None, None, reference]])
    jobs = []
    for line in range(first["output"].count("\n")):
        for signame in spec["signals"]:
            folder = os.path.join(root, f"{line}-{signame}")
            os.mkdir(folder)
            jobs.append([line, signame, folder])
    _run(spec, jobs)


def _run(spec: dict, jobs: list) -> list[dict]:
    pending = list(jobs)
    done = []
    selector = selectors.DefaultSelector()
    running: dict[int, dict] = {}
    while pending or running:
        while pending and len(running) < spec["parallel"]:
            line, signame, folder = pending.pop(0)
            argv = [a.replace("{out}", os.path.join(folder, "sparse.onnx")) for a in spec["argv"]]
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read_fd)
                _child(argv, write_fd)
            os.close(write_fd)
            running[read_fd] = {"line": line, "signal": signame, "folder": folder, "pid": pid, "text": b"",
                                "sent": False}
            selector.register(read_fd, selectors.EVENT_READ)
        for key, _ in selector.select(timeout=1.0):
            job = running[key.fd]
            chunk = os.read(key.fd, 65536)
            if chunk:
                job["text"] += chunk
                if job["line"] is not None and not job["sent"] and job["text"].count(b"\n") > job["line"]:
                    os.kill(job["pid"], getattr(signal, job["signal"]))
                    job["sent"] = True
                continue
            selector.unregister(key.fd)
            os.close(key.fd)
            del running[key.fd]
            _, status = os.waitpid(job["pid"], 0)
            done.append({"line": job["line"], "signal": job["signal"], "sent": job["sent"],
                         "status": os.waitstatus_to_exitcode(status),
                         "output": job["text"].decode("utf-8", errors="replace"),
                         "left": sorted(os.listdir(job["folder"]))})
            print(json.dumps(done[-1]), flush=True)
    return done


if __name__ == "__main__":
    started = time.monotonic()
    with open(sys.argv[1]) as fh:
        walk(json.load(fh))
    print(json.dumps({"seconds": round(time.monotonic() - started, 1)}), flush=True)
