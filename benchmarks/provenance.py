"""Which code, configuration, machine and libraries produced a benchmark row.

Every row ``benchmarks/run.py`` writes carries :func:`row_provenance`: the commit (and whether the working tree
differed from it), the method's full configuration, the machine, the thread count and the library versions, and
the date. ``benchmarks/report.py`` names the commits under each table from these fields.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.machine import cpu_model

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
# Files the benchmark itself rewrites while it runs: their changes do not make the code that runs differ from
# the commit.
OUTPUTS = ("benchmarks/results.json", "benchmarks/RESULTS.md", "benchmarks/curve.png")
VERSIONED = ("torch", "onnxruntime", "onnx", "numpy", "onnxsim")


@dataclass(frozen=True)
class GitState:
    commit: str | None  # full hash of HEAD; None outside a git checkout
    dirty: bool | None  # tracked or untracked changes besides OUTPUTS; None when unknown

    def label(self) -> str:
        if self.commit is None:
            return "unknown commit"
        return self.commit[:7] + ("+dirty" if self.dirty else "")


def _git(args: list[str], repo: Path) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.warning("git %s failed: %s", " ".join(args), exc)
        return None
    if done.returncode != 0:
        logger.warning("git %s exited %d: %s", " ".join(args), done.returncode, done.stderr.strip()[:200])
        return None
    return done.stdout


def git_state(repo: Path = REPO, ignore: tuple[str, ...] = OUTPUTS) -> GitState:
    """HEAD of ``repo`` and whether its working tree differs from it, outside ``ignore``."""
    head = _git(["rev-parse", "HEAD"], repo)
    if head is None:
        return GitState(None, None)
    status = _git(["status", "--porcelain", "--", ".", *(f":(exclude){p}" for p in ignore)], repo)
    return GitState(head.strip(), None if status is None else bool(status.strip()))


def versions() -> dict[str, str | None]:
    """Python and the installed versions of the libraries a benchmark row depends on (None: not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine() -> dict:
    """The CPU model, its logical CPU count and the platform."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform()}


@dataclass(frozen=True)
class Environment:
    """What is the same for every row of one ``run.py`` invocation."""

    git: GitState
    machine: dict
    versions: dict
    threads: int  # torch and onnxruntime intra-op threads the benchmark sets
    omp_num_threads: str | None  # OMP_NUM_THREADS as the process saw it

    @classmethod
    def capture(cls, threads: int, repo: Path = REPO) -> Environment:
        return cls(git_state(repo), machine(), versions(), threads, os.environ.get("OMP_NUM_THREADS"))


def row_provenance(env: Environment, config: dict) -> dict:
    """The provenance fields of one result row; ``config`` is the method's full configuration."""
    return {
        "commit": env.git.commit,
        "dirty": env.git.dirty,
        "config": config,
        "machine": dict(env.machine),
        "threads": env.threads,
        "omp_num_threads": env.omp_num_threads,
        "versions": dict(env.versions),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def row_label(row: dict) -> str:
    """The commit a row came from, as tables show it ("unrecorded" for rows written before rows carried it)."""
    if "commit" not in row:
        return "unrecorded"
    return GitState(row.get("commit"), row.get("dirty")).label()
