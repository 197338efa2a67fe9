"""The user's image preprocessing options: parsing and validating them, from the CLI, the library, a sidecar file
or the model metadata, and the named presets. Resolving them against a model is
:mod:`onnxsparse.data.preprocess_resolution`'s.

Pixel values go through ``(pixel * scale - mean) / std`` where ``pixel`` is in 0..255. ``mean`` and ``std`` are
given in the channel order the model receives, except preset values, which are stored in RGB order (reversed
when the resolved channel order is BGR).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from onnxsparse.data.images import DEFAULT_MAX_PIXELS
from onnxsparse.errors import OnnxSparseError
from onnxsparse.validate import boolean, int_at_least, is_int, is_number, one_of

CHANNEL_ORDERS = ("rgb", "bgr", "gray")
IMAGE_LAYOUTS = ("nchw", "nhwc")

# Keys a sidecar file or the model metadata may set.
DOCUMENTED_KEYS = ("scale", "mean", "std", "channel_order", "layout", "input_size", "resize", "crop")

# Preset mean/std are in RGB order (see module docstring).
PRESETS: dict[str, dict[str, Any]] = {
    # torchvision's ImageNet evaluation transform: Resize(256), CenterCrop(224), ToTensor, Normalize.
    "imagenet": {
        "resize": 256,
        "crop": (224, 224),
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "scale": 1.0 / 255.0,
        "channel_order": "rgb",
    },
    # Keras "caffe" mode: BGR, ImageNet mean pixel subtracted, no scaling; resized to the input size.
    "caffe": {
        "mean": (123.68, 116.779, 103.939),
        "std": (1.0,),
        "scale": 1.0,
        "channel_order": "bgr",
    },
    # Keras "tf" mode: pixels mapped to [-1, 1]; resized to the input size.
    "tf": {
        "mean": (0.5,),
        "std": (0.5,),
        "scale": 1.0 / 255.0,
        "channel_order": "rgb",
    },
    "none": {},
}


# ---------------------------------------------------------------------------------------------
# Value parsing, shared by PreprocessConfig, sidecar files and model metadata.
# ``label`` names the value the way the user wrote it ("--mean", "mean in preprocess.json").


def parse_size(value: Any, label: str = "--input-size") -> tuple[int, int]:
    """A (height, width) pair from ``224``, ``(224, 224)``, ``[224, 224]``, ``"224"`` or ``"224x224"``."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*(?:[xX*,]\s*(\d+)\s*)?", value)
        if not match:
            raise OnnxSparseError(f"{label} must be HxW (e.g. 224x224) or one number, got {value!r}")
        height = int(match.group(1))
        width = int(match.group(2)) if match.group(2) is not None else height
        value = (height, width)
    if is_int(value):
        value = (value, value)
    if (
        not isinstance(value, Sequence)
        or len(value) != 2
        or not all(is_int(v) and int(v) > 0 for v in value)
    ):
        raise OnnxSparseError(
            f"{label} must be one positive integer or two (height, width), got {value!r}"
        )
    return int(value[0]), int(value[1])


def parse_floats(value: Any, label: str) -> tuple[float, ...]:
    """A tuple of finite floats from a number, a sequence, or a string like ``"0.485,0.456,0.406"``."""
    if isinstance(value, str):
        parts = [p for p in re.split(r"[,\s]+", value.strip()) if p]
        try:
            value = tuple(_parse_number_text(p) for p in parts)
        except ValueError:
            raise OnnxSparseError(
                f"{label} must be comma-separated numbers (e.g. 0.485,0.456,0.406), got {value!r}"
            ) from None
    if is_number(value):
        value = (value,)
    if not isinstance(value, Sequence) or not value or not all(is_number(v) for v in value):
        raise OnnxSparseError(f"{label} must be one number or a list of numbers, got {value!r}")
    floats = tuple(float(v) for v in value)
    if not all(math.isfinite(v) for v in floats):
        raise OnnxSparseError(f"{label} must be finite numbers, got {value!r}")
    return floats


def _parse_number_text(text: str) -> float:
    if "/" in text:
        numerator, denominator = text.split("/", 1)
        return float(numerator) / float(denominator)
    return float(text)


def parse_scale(value: Any, label: str = "--scale") -> float:
    """A positive finite factor from a number or a string like ``"1/255"`` or ``"0.00392"``."""
    if isinstance(value, str):
        try:
            value = _parse_number_text(value.strip())
        except (ValueError, ZeroDivisionError):
            raise OnnxSparseError(f"{label} must be a number or a fraction like 1/255, got {value!r}") from None
    if not is_number(value) or not math.isfinite(float(value)) or float(value) <= 0:
        raise OnnxSparseError(f"{label} must be a positive finite number (e.g. 1/255), got {value!r}")
    return float(value)


def _std(value: Any, label: str) -> tuple[float, ...]:
    floats = parse_floats(value, label)
    if any(v <= 0 for v in floats):
        raise OnnxSparseError(f"{label} values must be > 0, got {value!r}")
    return floats


def _crop(value: Any, label: str) -> int | tuple[int, int]:
    if is_int(value):
        return int_at_least(value, label)
    return parse_size(value, label)


# Per documented key: (parser, CLI option name).
DOCUMENTED_PARSERS = {
    "resize": (int_at_least, "--resize"),
    "crop": (_crop, "--crop"),
    "input_size": (parse_size, "--input-size"),
    "mean": (parse_floats, "--mean"),
    "std": (_std, "--std"),
    "scale": (parse_scale, "--scale"),
    "channel_order": (lambda v, label: one_of(v, label, CHANNEL_ORDERS, ignore_case=True), "--channel-order"),
    "layout": (lambda v, label: one_of(v, label, IMAGE_LAYOUTS, ignore_case=True), "--layout"),
}


@dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing options given by the user; ``None`` means "not given", resolved later.

    ``crop`` and ``input_size`` take ints or (height, width); ``mean``/``std`` take one value for all
    channels or one per channel, in the model's channel order; ``scale`` multiplies 0..255 pixels.
    ``augment`` enables training-time augmentation for image sources; ``workers`` is the number of
    decoding processes (0 decodes in this process); images larger than ``max_pixels`` are skipped.
    """

    preset: str | None = None
    resize: int | None = None
    crop: int | tuple[int, int] | None = None
    input_size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    scale: float | None = None
    channel_order: str | None = None
    layout: str | None = None
    augment: bool = True
    workers: int = 2
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.preset is not None:
            object.__setattr__(self, "preset", one_of(self.preset, "--preset", tuple(PRESETS), ignore_case=True))
        for key, (parse, option) in DOCUMENTED_PARSERS.items():
            value = getattr(self, key)
            if value is not None:
                object.__setattr__(self, key, parse(value, option))
        boolean(self.augment, "augment")
        object.__setattr__(self, "workers", int_at_least(self.workers, "--workers", minimum=0))
        object.__setattr__(self, "max_pixels", int_at_least(self.max_pixels, "max_pixels"))

    def given(self) -> dict[str, Any]:
        """The documented preprocessing keys the user set (not None)."""
        return {key: getattr(self, key) for key in DOCUMENTED_KEYS if getattr(self, key) is not None}


def parse_documented(obj: Any, where: str) -> dict[str, Any]:
    """Validate a preprocessing JSON object from a sidecar file or the model metadata."""
    if not isinstance(obj, Mapping):
        raise OnnxSparseError(f"{where} must be a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(DOCUMENTED_KEYS))
    if unknown:
        raise OnnxSparseError(
            f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(DOCUMENTED_KEYS)}"
        )
    parsed = {}
    for key, value in obj.items():
        if value is None:
            continue
        parse, _ = DOCUMENTED_PARSERS[key]
        parsed[key] = parse(value, f"{key} in {where}")
    return parsed
