"""Run directories: checkpoints of a long run, and resuming it.

A checkpoint is tensors and plain data saved with ``torch.save`` and read back with
``torch.load(weights_only=True)``: no arbitrary objects are ever unpickled. ``run.json`` fingerprints the
run (model hash, configuration, calibration source) so a resume cannot silently mix two different runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import torch

from onnxsparse.errors import OnnxSparseError

logger = logging.getLogger(__name__)


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise OnnxSparseError(f"cannot write checkpoint {str(path)!r}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


class RunDir:
    """One run's folder. ``resume=False`` needs a folder without a run; ``resume=True`` one with this run."""

    def __init__(self, path: str | os.PathLike, fingerprint: dict, *, resume: bool) -> None:
        self.path = Path(path)
        fingerprint = json.loads(json.dumps(fingerprint, default=str))
        marker = self.path / "run.json"
        if resume:
            if not marker.is_file():
                raise OnnxSparseError(f"--resume {str(self.path)!r}: no onnxsparse run there (run.json missing)")
            saved = json.loads(marker.read_text())
            differs = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
            if differs:
                raise OnnxSparseError(
                    f"--resume {str(self.path)!r}: that run was started with a different {', '.join(differs)}; "
                    "resume it with the same model, data and options"
                )
            logger.info("resuming the run in %s", self.path)
            return
        if marker.exists():
            raise OnnxSparseError(
                f"run directory {str(self.path)!r} already holds a run; pass --resume {self.path} to continue it"
            )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OnnxSparseError(f"cannot create run directory {str(self.path)!r}: {exc.strerror or exc}") from None
        _write_atomic(marker, lambda tmp: tmp.write_text(json.dumps(fingerprint, indent=2)))

    def save(self, name: str, state: dict[str, Any]) -> None:
        """Save tensors and plain data (dict, list, str, int, float, bool, None) under ``name``."""
        _write_atomic(self.path / f"{name}.pt", lambda tmp: torch.save(state, tmp))
        logger.info("checkpoint %s saved in %s", name, self.path)

    def load(self, name: str) -> dict[str, Any] | None:
        path = self.path / f"{name}.pt"
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: refuse it, whatever torch raised
            raise OnnxSparseError(f"checkpoint {str(path)!r} cannot be read safely: {exc}") from None
