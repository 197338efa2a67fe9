"""Decoding image files into fixed-size arrays, in worker processes, skipping bad files.

This module must stay cheap to import (numpy and Pillow only): worker processes import it.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
import itertools
import time
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from onnxsparse.errors import OnnxSparseError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# Larger images are skipped without being decoded (10,000 x 10,000 pixels).
DEFAULT_MAX_PIXELS = 100_000_000

# Why a file was skipped; CalibrationSet.skipped always has these keys for image sources.
SKIP_REASONS = ("unreadable", "truncated", "too_large", "unsupported_mode")

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass(frozen=True)
class DecodePlan:
    """What happens to every image file: the result is a (height, width[, 3]) array.

    ``resize`` resizes the shorter side (aspect kept); ``crop`` center-crops; without a crop, a
    resized image is center-cropped to ``size`` and an image that is not resized is resized to ``size``.
    """

    gray: bool
    resize: int | None
    crop: tuple[int, int] | None
    size: tuple[int, int]
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.resize is not None and self.resize <= 0:
            raise OnnxSparseError(f"resize must be > 0, got {self.resize}")
        if len(self.size) != 2 or min(self.size) <= 0:
            raise OnnxSparseError(f"size must be two positive ints, got {self.size}")
        if self.crop is not None and tuple(self.crop) != tuple(self.size):
            raise OnnxSparseError(f"crop {self.crop} must equal the size {self.size}")
        if self.max_pixels <= 0:
            raise OnnxSparseError(f"max_pixels must be > 0, got {self.max_pixels}")

    @property
    def channels(self) -> int:
        return 1 if self.gray else 3


@dataclass(frozen=True)
class Decoded:
    """One file's outcome: ``array`` (uint8 or float32 in 0..255) or a skip ``reason`` and message."""

    array: np.ndarray | None
    reason: str | None = None
    message: str | None = None


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _shorter_side_size(width: int, height: int, target: int) -> tuple[int, int]:
    # Same rounding as torchvision's Resize(int): the longer side is truncated, not rounded.
    if width <= height:
        return target, int(target * height / width)
    return int(target * width / height), target


def _center_crop_box(width: int, height: int, crop_h: int, crop_w: int) -> tuple[int, int, int, int]:
    # torchvision's CenterCrop: pad symmetrically (extra pixel right/bottom) when the image is
    # smaller than the crop, then take the offset round((size - crop) / 2) with Python rounding.
    # PIL's crop fills the area outside the image with zeros, which is that padding.
    pad_left = (crop_w - width) // 2 if crop_w > width else 0
    pad_top = (crop_h - height) // 2 if crop_h > height else 0
    left = int(round((max(width, crop_w) - crop_w) / 2.0)) - pad_left
    top = int(round((max(height, crop_h) - crop_h) / 2.0)) - pad_top
    return left, top, left + crop_w, top + crop_h


def _convert(img: Image.Image, gray: bool) -> Image.Image:
    """An "L", "RGB" or "F" (16-bit grayscale rescaled to 0..255) image."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(img)
        if mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise _Unsupported(f"32-bit integer pixels outside 0..65535 (mode {mode})")
        scaled = values.astype(np.float32) * np.float32(255.0 / 65535.0)
        return Image.fromarray(scaled, mode="F")
    if mode == "F":
        raise _Unsupported("32-bit float pixels (mode F) have no defined value range")
    if mode in ("P", "PA"):
        img = img.convert("RGBA")
    target = "L" if gray else "RGB"
    if img.mode == target:
        return img
    try:
        return img.convert(target)
    except (ValueError, OSError) as exc:
        raise _Unsupported(f"cannot convert mode {img.mode} to {target}: {exc}") from None


class _Unsupported(Exception):
    pass


def transform_image(img: Image.Image, plan: DecodePlan) -> np.ndarray:
    """Apply ``plan`` to a loaded image; returns (H, W) for gray or (H, W, 3), uint8 or float32."""
    img = _convert(img, plan.gray)
    height, width = plan.size
    if plan.resize is not None:
        new_w, new_h = _shorter_side_size(img.width, img.height, plan.resize)
        if (new_w, new_h) != img.size:
            img = img.resize((new_w, new_h), Image.BILINEAR)
    if img.size != (width, height):
        if plan.resize is not None or plan.crop is not None:
            img = img.crop(_center_crop_box(img.width, img.height, height, width))
        else:
            img = img.resize((width, height), Image.BILINEAR)
    array = np.asarray(img)
    if array.ndim == 2 and not plan.gray:
        # 16-bit grayscale feeding an RGB input: same value in every channel.
        array = np.repeat(array[:, :, None], 3, axis=2)
    return array


def decode_image(path: str, plan: DecodePlan) -> Decoded:
    """Open, check and transform one file; never raises for a bad file."""
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check replaces Pillow's warning; its hard limit error is still caught.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > plan.max_pixels:
                    return Decoded(
                        None,
                        "too_large",
                        f"{width}x{height} pixels is over the limit of {plan.max_pixels:,}",
                    )
                img.load()
                return Decoded(transform_image(img, plan))
    except Image.DecompressionBombError as exc:
        return Decoded(None, "too_large", str(exc))
    except UnidentifiedImageError:
        return Decoded(None, "unreadable", "not a recognised image format")
    except _Unsupported as exc:
        return Decoded(None, "unsupported_mode", str(exc))
    except OSError as exc:
        reason = "truncated" if "truncated" in str(exc).lower() else "unreadable"
        return Decoded(None, reason, f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001 - corrupt files make Pillow plugins raise anything
        return Decoded(None, "unreadable", f"{type(exc).__name__}: {exc}")


def _decode_chunk(paths: Sequence[str], plan: DecodePlan) -> list[Decoded]:
    return [decode_image(p, plan) for p in paths]


def _pool_context() -> multiprocessing.context.BaseContext:
    # fork starts workers in milliseconds and the workers only run Pillow and numpy; elsewhere
    # (macOS, Windows) fork is unsafe or missing.
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


class DecoderPool:
    """Decodes files with one plan, in order, in ``workers`` processes (0 decodes in this process).

    A context manager: the worker processes live until it exits. Files are sent to the workers in
    windows of ``window``, so a long list is decoded with bounded memory.
    """

    def __init__(self, plan: DecodePlan, workers: int, *, window: int = 512) -> None:
        self.plan = plan
        self.workers = workers
        self.window = window
        self._executor = (
            ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context()) if workers > 0 else None
        )

    def __enter__(self) -> DecoderPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def decode(self, paths: Sequence[str]) -> Iterator[Decoded]:
        """One :class:`Decoded` per path, in path order."""
        for start in range(0, len(paths), self.window):
            window = paths[start : start + self.window]
            if self._executor is None:
                yield from (decode_image(p, self.plan) for p in window)
                continue
            chunk_size = max(1, min(32, len(window) // (4 * self.workers)))
            chunks = (window[i : i + chunk_size] for i in range(0, len(window), chunk_size))
            try:
                for chunk in self._executor.map(_decode_chunk, chunks, itertools.repeat(self.plan)):
                    yield from chunk
            except BrokenProcessPool as exc:
                raise OnnxSparseError(
                    f"an image decoding worker process died ({exc}); rerun with workers=0 (--workers 0) to "
                    "decode in-process and find the file"
                ) from None


@dataclass
class DecodeStats:
    """Counts and timing of one decoding run (mutable: filled while decoding)."""

    decoded: int = 0
    seconds: float = 0.0
    workers: int = 0
    skipped: Counter | None = None
    examples: list | None = None

    @property
    def images_per_second(self) -> float:
        return self.decoded / self.seconds if self.seconds > 0 else 0.0


def decode_files(
    paths: Sequence[str],
    plan: DecodePlan,
    want: int,
    on_image: Callable[[int, np.ndarray], None],
    *,
    workers: int,
    progress: bool = True,
) -> DecodeStats:
    """Decode ``paths`` in order until ``want`` images succeeded or the paths run out.

    ``on_image(k, array)`` receives the k-th good image (k = 0, 1, ...), in path order. Bad files
    are counted by reason and skipped; decoding uses ``workers`` processes (0 = this process).
    """
    from tqdm import tqdm

    stats = DecodeStats(workers=workers, skipped=Counter({r: 0 for r in SKIP_REASONS}), examples=[])
    start = time.perf_counter()
    position = 0
    with tqdm(total=want, desc="decoding calibration images", unit="img", disable=None if progress else True) as bar, \
            DecoderPool(plan, workers) as pool:
        while stats.decoded < want and position < len(paths):
            # Only as many files as still needed; bad files are replaced by the next ones.
            window = paths[position : position + (want - stats.decoded)]
            position += len(window)
            for path, decoded in zip(window, pool.decode(window)):
                if decoded.array is None:
                    stats.skipped[decoded.reason] += 1
                    stats.examples.append(f"{path}: {decoded.message}")
                    log.debug("skipping %s: %s (%s)", path, decoded.reason, decoded.message)
                    continue
                on_image(stats.decoded, decoded.array)
                stats.decoded += 1
                bar.update(1)
    stats.seconds = time.perf_counter() - start
    return stats
