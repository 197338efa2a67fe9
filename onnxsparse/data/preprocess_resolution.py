"""Resolving the user's preprocessing options against what the model declares, into the image pipeline for one
model input (:class:`ResolvedPreprocess`).

Resolution order for every setting, highest first: explicit user option, sidecar file
(``preprocess.json`` next to the model), model metadata (``metadata_props`` key
``onnxsparse.preprocess``), preset, the model input shape, built-in default.

Pixel values go through ``(pixel * scale - mean) / std`` where ``pixel`` is in 0..255 (16-bit images
are rescaled into that range first); preset mean/std, stored in RGB order, are reversed when the resolved
channel order is BGR.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx

from onnxsparse.data.images import DEFAULT_MAX_PIXELS, DecodePlan
from onnxsparse.data.preprocess_options import (
    DOCUMENTED_PARSERS,
    PRESETS,
    PreprocessConfig,
    parse_documented,
    parse_size,
)
from onnxsparse.data.spec import InputSpec
from onnxsparse.errors import OnnxSparseError
from onnxsparse.validate import one_of

log = logging.getLogger(__name__)

METADATA_KEY = "onnxsparse.preprocess"
SIDECAR_NAME = "preprocess.json"

SOURCE_USER = "user"
SOURCE_SIDECAR = "sidecar"
SOURCE_METADATA = "model metadata"
SOURCE_PRESET = "preset"
SOURCE_SHAPE = "model input shape"
SOURCE_DEFAULT = "default"
SOURCES = (SOURCE_USER, SOURCE_SIDECAR, SOURCE_METADATA, SOURCE_PRESET, SOURCE_SHAPE, SOURCE_DEFAULT)

DEFAULT_SCALE = 1.0 / 255.0


def read_model_metadata(model: onnx.ModelProto) -> dict[str, Any] | None:
    """The preprocessing documented in the model's metadata_props, or None."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            where = f"model metadata {METADATA_KEY!r}"
            try:
                obj = json.loads(prop.value)
            except json.JSONDecodeError as exc:
                raise OnnxSparseError(f"{where} is not valid JSON: {exc}") from None
            return parse_documented(obj, where)
    return None


def read_sidecar(model_path: str | os.PathLike | None) -> tuple[dict[str, Any] | None, Path | None]:
    """The preprocessing documented in ``preprocess.json`` next to the model file, and its path."""
    path = Path(model_path).parent / SIDECAR_NAME if model_path is not None else None
    if path is None or not path.is_file():
        return None, None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise OnnxSparseError(f"cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise OnnxSparseError(f"{path} is not valid JSON: {exc}") from None
    return parse_documented(obj, str(path)), path


# ---------------------------------------------------------------------------------------------
# Resolution


@dataclass(frozen=True)
class Setting:
    """A resolved value and where it came from (one of SOURCES)."""

    value: Any
    source: str

    def __post_init__(self) -> None:
        one_of(self.source, "setting source", SOURCES)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


@dataclass(frozen=True)
class ResolvedPreprocess:
    """The image pipeline for one model input, every setting with its source."""

    input_name: str
    preset: str | None
    sidecar: str | None
    layout: Setting
    channels: Setting
    channel_order: Setting
    input_size: Setting
    resize: Setting
    crop: Setting
    scale: Setting
    mean: Setting
    std: Setting
    max_pixels: int = DEFAULT_MAX_PIXELS
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        channels = self.channels.value
        if channels not in (1, 3):
            raise OnnxSparseError(f"image inputs need 1 or 3 channels, got {channels}")
        if len(self.mean.value) != channels or len(self.std.value) != channels:
            raise OnnxSparseError(
                f"mean and std need {channels} values each, got {self.mean.value} and {self.std.value}"
            )
        if (self.channel_order.value == "gray") != (channels == 1):
            raise OnnxSparseError(
                f"channel order {self.channel_order.value} does not fit {channels} channel(s)"
            )

    @property
    def gray(self) -> bool:
        return self.channels.value == 1

    def plan(self) -> DecodePlan:
        """What each decoding worker does to one file."""
        return DecodePlan(
            gray=self.gray,
            resize=self.resize.value,
            crop=self.crop.value,
            size=self.input_size.value,
            max_pixels=self.max_pixels,
        )

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """The shape of one preprocessed image in the model's layout."""
        height, width = self.input_size.value
        channels = self.channels.value
        return (channels, height, width) if self.layout.value == "nchw" else (height, width, channels)

    def to_input(self, pixels: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """One decoded image ((H, W) or (H, W, C), RGB, 0..255) as float32 model input, written into ``out``.

        The one place where pixels become model input: ``prune``'s calibration images and ``eval``'s and
        ``compare``'s batches all go through it.
        """
        if out is None:
            out = np.empty(self.sample_shape, np.float32)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if self.channel_order.value == "bgr":
            pixels = pixels[:, :, ::-1]
        nchw = self.layout.value == "nchw"
        out[...] = pixels.transpose(2, 0, 1) if nchw else pixels
        per_channel = (-1, 1, 1) if nchw else (1, 1, -1)
        out *= np.float32(self.scale.value)
        out -= np.asarray(self.mean.value, np.float32).reshape(per_channel)
        out /= np.asarray(self.std.value, np.float32).reshape(per_channel)
        return out

    def steps(self) -> list[str]:
        height, width = self.input_size.value
        steps = ["decode to " + ("grayscale" if self.gray else "RGB")]
        if self.resize.value is not None:
            steps.append(f"resize shorter side to {self.resize.value} (bilinear)")
        if self.crop.value is not None:
            steps.append(f"center crop {self.crop.value[0]}x{self.crop.value[1]}")
        elif self.resize.value is not None:
            steps.append(f"center crop {height}x{width} (input size)")
        else:
            steps.append(f"resize to {height}x{width} (bilinear, where the size differs)")
        if self.channel_order.value == "bgr":
            steps.append("reverse channels to BGR")
        steps.append(f"multiply by {self.scale.value:.6g}")
        if any(m != 0.0 for m in self.mean.value):
            steps.append("subtract mean " + ", ".join(f"{m:.6g}" for m in self.mean.value))
        if any(s != 1.0 for s in self.std.value):
            steps.append("divide by std " + ", ".join(f"{s:.6g}" for s in self.std.value))
        steps.append(f"layout {self.layout.value.upper()}")
        return steps

    def settings(self) -> dict[str, Setting]:
        """Every setting by name, in field order (layout, channels, ..., std)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: value for name, value in values.items() if isinstance(value, Setting)}

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable description for the report."""
        return {
            "input": self.input_name,
            "preset": self.preset,
            "sidecar": self.sidecar,
            "settings": {
                key: {"value": _jsonable(s.value), "source": s.source} for key, s in self.settings().items()
            },
            "steps": self.steps(),
            "notes": list(self.notes),
        }

    def describe(self) -> str:
        parts = [
            f"{key}={_format_value(s.value)} ({s.source})" for key, s in self.settings().items()
        ]
        return f"input {self.input_name!r}: " + ", ".join(parts)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, tuple):
        if len(value) == 2 and all(isinstance(v, int) for v in value):
            return f"{value[0]}x{value[1]}"
        return "(" + ", ".join(_format_value(v) for v in value) + ")"
    return str(value)


@dataclass(frozen=True)
class _Sources:
    """What each source documents, highest priority first, and how an error names a value it gave."""

    layers: tuple[tuple[str, Mapping[str, Any]], ...]
    sidecar_file: Path | None
    preset_name: str

    def pick(self, key: str) -> Setting | None:
        for source, values in self.layers:
            if values.get(key) is not None:
                return Setting(values[key], source)
        return None

    def label(self, key: str, setting: Setting) -> str:
        """How an error names ``setting``: the CLI option, or the key and the file or metadata that set it."""
        if setting.source == SOURCE_USER:
            return DOCUMENTED_PARSERS[key][1]
        if setting.source == SOURCE_SIDECAR:
            return f"{key} in {self.sidecar_file}"
        if setting.source == SOURCE_METADATA:
            return f"{key} in model metadata {METADATA_KEY!r}"
        return f"{key} ({setting.source})"


def resolve_preprocess(
    config: PreprocessConfig,
    spec: InputSpec,
    *,
    model: onnx.ModelProto | None = None,
    model_path: str | os.PathLike | None = None,
) -> ResolvedPreprocess:
    """Resolve ``config`` against the model's declared input, sidecar file and metadata."""
    if not spec.is_image:
        raise OnnxSparseError(
            f"input {spec.name!r} has shape {spec.describe_shape()}, not a 4-D image input; "
            "an image folder needs an NCHW or NHWC input (use .npy/.npz tensors for other inputs)"
        )
    metadata = read_model_metadata(model) if model is not None else None
    sidecar, sidecar_file = read_sidecar(model_path)
    sources = _Sources(
        layers=(
            (SOURCE_USER, config.given()),
            (SOURCE_SIDECAR, sidecar or {}),
            (SOURCE_METADATA, metadata or {}),
            (SOURCE_PRESET, PRESETS[config.preset or "none"]),
        ),
        sidecar_file=sidecar_file,
        preset_name=config.preset or "none",
    )
    notes: list[str] = []
    layout = _resolve_layout(sources, spec)
    channels, order = _resolve_channels(sources, spec, layout)
    size, crop = _resolve_input_size(sources, spec, layout)
    resize, crop = _fit_crop_to_input_size(sources, sources.pick("resize") or Setting(None, SOURCE_DEFAULT),
                                           crop, size, notes)
    resolved = ResolvedPreprocess(
        input_name=spec.name,
        preset=config.preset,
        sidecar=str(sidecar_file) if sidecar_file is not None else None,
        layout=layout,
        channels=channels,
        channel_order=order,
        input_size=size,
        resize=resize,
        crop=crop,
        scale=sources.pick("scale") or Setting(DEFAULT_SCALE, SOURCE_DEFAULT),
        mean=_per_channel("mean", sources.pick("mean"), 0.0, channels.value, order.value, spec, sources),
        std=_per_channel("std", sources.pick("std"), 1.0, channels.value, order.value, spec, sources),
        max_pixels=config.max_pixels,
        notes=tuple(notes),
    )
    for note in notes:
        log.info("%s", note)
    log.info("calibration preprocessing: %s", resolved.describe())
    log.info("calibration pipeline: %s", " -> ".join(resolved.steps()))
    return resolved


def _resolve_layout(sources: _Sources, spec: InputSpec) -> Setting:
    """The documented layout, else the declared shape's (a default where both axes could hold channels)."""
    layout = sources.pick("layout")
    if layout is not None:
        return layout
    channels_first = spec.shape[1] is not None and spec.shape[1] <= 4
    channels_last = spec.shape[3] is not None and spec.shape[3] <= 4
    certain = channels_first != channels_last
    return Setting(spec.layout, SOURCE_SHAPE if certain else SOURCE_DEFAULT)


def _resolve_channels(sources: _Sources, spec: InputSpec, layout: Setting) -> tuple[Setting, Setting]:
    """(channels, channel order): the declared count, else the one the channel order implies; they must agree."""
    shape_text = spec.describe_shape()
    declared = spec.shape[spec.channel_axis(layout.value)]
    order = sources.pick("channel_order")
    if declared is not None:
        if declared not in (1, 3):
            raise OnnxSparseError(
                f"input {spec.name!r} has {declared} channels (shape {shape_text}, layout "
                f"{layout.value.upper()} from {layout.source}); image folders feed 1-channel (gray) or "
                "3-channel (RGB/BGR) inputs"
            )
        channels = Setting(declared, SOURCE_SHAPE)
    elif order is not None:
        channels = Setting(1 if order.value == "gray" else 3, order.source)
    else:
        channels = Setting(3, SOURCE_DEFAULT)

    if channels.value == 1:
        if order is not None and order.value != "gray" and order.source != SOURCE_PRESET:
            raise OnnxSparseError(
                f"{sources.label('channel_order', order)} is {order.value} but input {spec.name!r} has 1 channel "
                f"(shape {shape_text}); use gray or leave it unset"
            )
        if order is None or order.value != "gray":
            order = Setting("gray", SOURCE_SHAPE if channels.source == SOURCE_SHAPE else channels.source)
    else:
        if order is not None and order.value == "gray":
            raise OnnxSparseError(
                f"{sources.label('channel_order', order)} is gray but input {spec.name!r} has 3 channels "
                f"(shape {shape_text}); use rgb or bgr"
            )
        if order is None:
            order = Setting("rgb", SOURCE_DEFAULT)
    return channels, order


def _resolve_input_size(sources: _Sources, spec: InputSpec, layout: Setting) -> tuple[Setting, Setting | None]:
    """(input size, crop): declared height/width win, and a documented size must agree with them."""
    shape_text = spec.describe_shape()
    declared_h, declared_w = spec.spatial_dims(layout.value)
    size = sources.pick("input_size")
    crop = sources.pick("crop")
    if crop is not None:
        crop = Setting(parse_size(crop.value, sources.label("crop", crop)), crop.source)
    if size is not None:
        height, width = size.value
        if (declared_h is not None and declared_h != height) or (declared_w is not None and declared_w != width):
            raise OnnxSparseError(
                f"{sources.label('input_size', size)} is {height}x{width} but input {spec.name!r} has shape "
                f"{shape_text} ({_dim(declared_h)}x{_dim(declared_w)}); use the model's size or leave it unset"
            )
    elif declared_h is not None and declared_w is not None:
        size = Setting((declared_h, declared_w), SOURCE_SHAPE)
    elif crop is not None and crop.source != SOURCE_PRESET and _fits(crop.value, declared_h, declared_w):
        size = Setting(crop.value, crop.source)
    else:
        raise OnnxSparseError(
            f"input {spec.name!r} has a dynamic height or width (shape {shape_text}); pass --input-size HxW "
            f"(or set input_size in {SIDECAR_NAME} next to the model)"
        )
    return size, crop


def _fit_crop_to_input_size(sources: _Sources, resize: Setting, crop: Setting | None, size: Setting,
                            notes: list[str]) -> tuple[Setting, Setting]:
    """(resize, crop) for the input size: a preset's crop (and resize, in proportion) is scaled to it, a
    documented crop must equal it."""
    preset_name = sources.preset_name
    if crop is not None and crop.value != size.value:
        if crop.source != SOURCE_PRESET:
            raise OnnxSparseError(
                f"{sources.label('crop', crop)} is {_format_value(crop.value)} but the input size is "
                f"{_format_value(size.value)} (from {size.source}); the crop must equal the input size"
            )
        # Keep the preset's resize-to-crop ratio at the model's size (e.g. 256/224 for imagenet).
        if resize.source == SOURCE_PRESET and resize.value is not None:
            scaled = round(resize.value * min(size.value) / min(crop.value))
            notes.append(
                f"preset {preset_name} resize {resize.value} / crop {_format_value(crop.value)} scaled to "
                f"the input size: resize {scaled}, crop {_format_value(size.value)}"
            )
            resize = Setting(scaled, SOURCE_PRESET)
        else:
            notes.append(f"preset {preset_name} crop {_format_value(crop.value)} replaced by the input size")
        crop = Setting(size.value, SOURCE_PRESET)
    if crop is None:
        crop = Setting(None, SOURCE_DEFAULT)
    if resize.value is not None and max(crop.value or size.value) > resize.value:
        log.warning(
            "resize %d is smaller than the crop %s: images are padded with zeros where they are "
            "smaller than the crop (as torchvision's CenterCrop does)",
            resize.value,
            _format_value(crop.value or size.value),
        )
    return resize, crop


def _dim(value: int | None) -> str:
    return "?" if value is None else str(value)


def _fits(size: tuple[int, int], height: int | None, width: int | None) -> bool:
    return (height is None or height == size[0]) and (width is None or width == size[1])


def _per_channel(
    key: str,
    setting: Setting | None,
    default: float,
    channels: int,
    order: str,
    spec: InputSpec,
    sources: _Sources,
) -> Setting:
    if setting is None:
        return Setting((default,) * channels, SOURCE_DEFAULT)
    values = tuple(setting.value)
    if len(values) == 1:
        return Setting(values * channels, setting.source)
    if len(values) != channels:
        if setting.source == SOURCE_PRESET:
            raise OnnxSparseError(
                f"preset {sources.preset_name} has {len(values)} {key} values but input {spec.name!r} has {channels} "
                f"channel(s); use --preset none or pass --mean and --std with {channels} value(s)"
            )
        raise OnnxSparseError(
            f"{sources.label(key, setting)} must have {channels} value{'s' if channels > 1 else ''} "
            f"(one per channel) or 1 for all, got {len(values)}: {', '.join(f'{v:g}' for v in values)}"
        )
    if setting.source == SOURCE_PRESET and order == "bgr":
        values = values[::-1]
    return Setting(values, setting.source)
