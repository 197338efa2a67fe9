"""Explicit device selection; no global state beyond what torch itself keeps."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from onnxsparse.errors import OnnxSparseError


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise OnnxSparseError(f"--device {spec} requested but CUDA is not available; use --device cpu or auto")
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise OnnxSparseError(
                f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible (cuda:0..)"
            )
        return device
    return torch.device("cpu")


@contextlib.contextmanager
def determinism(enabled: bool, device: torch.device) -> Iterator[None]:
    """With ``enabled`` on a CUDA ``device``: torch's deterministic algorithms, cuDNN without autotuning, TF32
    and bf16 autocast off, for the duration of the run (torch's global flags are restored afterwards). On the CPU
    the same command, seed and thread count already give the same bits; nothing changes there."""
    if not enabled or device.type != "cuda":
        yield
        return
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # cuBLAS's reproducible workspace (read at first use)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[4], saved[5]
        if saved[6] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[6]


# What to lower when a phase runs out of device memory: (flag, PruneConfig attribute holding its value)
_OOM_FLAGS = {
    "statistics correction": ("--correction-samples", "correction_samples"),
    "allocation": ("--batch-size", "batch_size"),
    "training": ("--batch-size", "batch_size"),
    "finish": ("--correction-samples", "correction_samples"),
}


@contextlib.contextmanager
def oom_phase(name: str) -> Iterator[None]:
    """Tag a CUDA out-of-memory error raised inside with the phase ``name`` (the innermost phase wins)."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        if getattr(exc, "onnxsparse_phase", None) is None:
            exc.onnxsparse_phase = name
        raise


def out_of_memory(exc: BaseException, device: torch.device, config) -> OnnxSparseError:
    """The user's message for a CUDA OOM: the phase it hit and the flag that sizes that phase."""
    phase = getattr(exc, "onnxsparse_phase", None)
    flag, attr = _OOM_FLAGS.get(phase, ("--batch-size", "batch_size"))
    where = f" during {phase}" if phase else ""
    return OnnxSparseError(
        f"out of memory on {device}{where} with {flag} {getattr(config, attr)} per batch; lower {flag} "
        "or use --device cpu"
    )
