"""Explicit device selection; no global state beyond what torch itself keeps."""

from __future__ import annotations

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
