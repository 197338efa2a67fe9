"""Loading calibration data from any supported source, and splitting it into a train/selection/verification
:class:`~onnxsparse.data.calibration_set.CalibrationSet`."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from onnxsparse.data.calibration_set import CalibrationSet
from onnxsparse.data.images import IMAGE_EXTENSIONS, DecodeStats, decode_files, is_image_file
from onnxsparse.data.preprocess_options import PreprocessConfig
from onnxsparse.data.preprocess_resolution import resolve_preprocess
from onnxsparse.data.spec import InputSpec, input_specs
from onnxsparse.data.tensors import (
    FeedCollector,
    collect_files,
    collect_stream,
    dataset_items,
    is_tensor_file,
    reader_items,
)
from onnxsparse.errors import OnnxSparseError
from onnxsparse.validate import is_int, optional_int_at_least

log = logging.getLogger(__name__)

# Decoded images kept in memory when max_samples is not given (train + selection, float32).
DEFAULT_IMAGE_CACHE_BYTES = 2 * 1024**3

MIN_SAMPLES = 2


def default_held_out_size(n: int) -> int:
    """The default size of the selection split and of the verification split, each: 10% of the samples, at least 32
    and at most 1000, and never more than a third of them (training keeps the rest)."""
    return min(max(math.ceil(0.1 * n), 32), 1000, n // 3)


# ---------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class _Folder:
    root: Path
    images: tuple[Path, ...]
    tensors: tuple[Path, ...]
    others: tuple[Path, ...]

    def check_one_kind(self, name: str, option: str) -> None:
        """Refuse a folder of both images and tensors; ``name`` and ``option`` say how the user gave it."""
        if self.images and self.tensors:
            raise OnnxSparseError(
                f"{name} {self.root} holds both image files ({len(self.images)}) and .npy/.npz files "
                f"({len(self.tensors)}, e.g. {self.tensors[0]}); point {option} at one kind"
            )


def scan_calibration_folder(root: Path) -> _Folder:
    images, tensors, others = [], [], []
    seen: set[str] = set()
    any_entry = False

    def on_error(exc: OSError) -> None:
        log.warning("cannot list %s: %s", exc.filename, exc.strerror)

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            # A symlink loop or a folder linked twice: list it once.
            dirnames[:] = []
            continue
        seen.add(real)
        any_entry = any_entry or bool(dirnames or filenames)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if is_image_file(name):
                images.append(path)
            elif is_tensor_file(name):
                tensors.append(path)
            else:
                others.append(path)
    if not any_entry:
        raise OnnxSparseError(f"calibration folder {root} is empty")

    def ordered(paths: list[Path]) -> tuple[Path, ...]:
        return tuple(sorted(paths, key=lambda p: p.relative_to(root).as_posix()))

    return _Folder(root, ordered(images), ordered(tensors), ordered(others))


@dataclass(frozen=True)
class SplitSizes:
    verification: int
    selection: int
    train: int

    @property
    def held_out(self) -> int:
        return self.verification + self.selection

    @property
    def total(self) -> int:
        return self.verification + self.selection + self.train

    def indices(self, order) -> tuple:
        """(train, selection, verification) index sets of a permutation: verification first, then selection."""
        v, h = self.verification, self.held_out
        return order[h : h + self.train], order[v:h], order[:v]

    def slices(self) -> tuple[slice, slice, slice]:
        """:meth:`indices` of positions already in permuted order (views, not copies)."""
        return (
            slice(self.held_out, self.total), slice(self.verification, self.held_out), slice(0, self.verification))


def _split_sizes(
    n: int, max_samples: int | None, selection_size: int | None, verify_size: int | None, where: str,
    cap: int | None = None,
) -> SplitSizes:
    """Verification, selection and train sample counts for ``n`` available samples.

    ``max_samples`` caps the samples used (all three splits); without it, ``cap`` does (the memory
    budget for decoded images). The selection and verification sizes default to
    :func:`default_held_out_size` of that.
    """
    if n < MIN_SAMPLES:
        raise OnnxSparseError(
            f"{where} has {n} usable sample(s); calibration needs at least {MIN_SAMPLES} "
            "(one for training, one for the selection)"
        )
    use = n
    if max_samples is not None:
        use = min(n, max_samples)
        if use < MIN_SAMPLES:
            raise OnnxSparseError(
                f"--max-samples {max_samples} is too small; calibration needs at least {MIN_SAMPLES} samples "
                "(one for training, one for the selection)"
            )
    elif cap is not None and n > cap:
        use = cap
        log.info(
            "using %d of %d samples to keep decoded images within %.1f GiB; pass max_samples to change",
            use, n, DEFAULT_IMAGE_CACHE_BYTES / 1024**3,
        )
    selection = default_held_out_size(use) if selection_size is None else selection_size
    verification = default_held_out_size(use) if verify_size is None else verify_size
    if selection + verification >= use:
        used = f"{where} has {n} sample(s)" + (f", {use} used (max_samples)" if use < n else "")
        raise OnnxSparseError(
            f"--selection-size {selection} and --verify-size {verification} leave no training samples: {used}; "
            f"their sum must be below {use}"
        )
    return SplitSizes(verification, selection, use - selection - verification)


def _validate_args(
    preprocess: PreprocessConfig, max_samples: int | None, selection_size: int | None, verify_size: int | None,
    seed: int,
) -> None:
    if not isinstance(preprocess, PreprocessConfig):
        raise OnnxSparseError(f"preprocess must be a PreprocessConfig, got {type(preprocess).__name__}")
    optional_int_at_least(max_samples, "--max-samples")
    optional_int_at_least(selection_size, "--selection-size", minimum=0)
    optional_int_at_least(verify_size, "--verify-size", minimum=0)
    if not is_int(seed):
        raise OnnxSparseError(f"--seed must be an integer, got {seed!r}")


def _check_inputs(specs: list[InputSpec]) -> None:
    for spec in specs:
        if not (spec.is_float or spec.is_integer):
            raise OnnxSparseError(
                f"input {spec.name!r} is a {spec.dtype} tensor; onnxsparse calibrates models whose inputs are "
                "float (float16, float32, float64), integer or bool tensors"
            )


def _split_info(n: int, sizes: SplitSizes, seed: int, max_samples, selection_size, verify_size) -> dict:
    return {
        "seed": seed,
        "available": n,
        "train": sizes.train,
        "selection": sizes.selection,
        "verification": sizes.verification,
        "max_samples": max_samples,
        "selection_size": {"value": sizes.selection, "source": "user" if selection_size is not None else "default"},
        "verify_size": {"value": sizes.verification, "source": "user" if verify_size is not None else "default"},
    }


def load_calibration(
    source: Any,
    model: onnx.ModelProto,
    *,
    model_path: str | os.PathLike | None = None,
    preprocess: PreprocessConfig = PreprocessConfig(),
    max_samples: int | None = None,
    selection_size: int | None = None,
    verify_size: int | None = None,
    seed: int = 0,
) -> CalibrationSet:
    """Load, preprocess and split calibration data for ``model``.

    ``source`` is a folder of images (searched recursively), a folder of .npy/.npz files, one
    .npy/.npz file, a dict of input name -> batch array, an array (single-input models), an
    onnxruntime CalibrationDataReader-like object (``get_next()``), an iterable of feed dicts, or a
    torch Dataset/DataLoader. ``max_samples`` caps the samples used (train + selection; streams stop
    reading there); the verification split (``verify_size``) is drawn first from a permutation seeded with
    ``seed``, the selection split (``selection_size``) next (each by default 10% within 32..1000, at most a
    third), the training split takes the rest.
    """
    _validate_args(preprocess, max_samples, selection_size, verify_size, seed)
    specs = input_specs(model)
    _check_inputs(specs)
    options = (preprocess, max_samples, selection_size, verify_size, seed)
    if isinstance(source, (str, os.PathLike)):
        return _load_path(Path(source), specs, model, model_path, options)
    if isinstance(source, (Mapping, np.ndarray, torch.Tensor)):
        collector = FeedCollector(specs)
        collector.add_item(source, "feed")
        kind = "feed dict" if isinstance(source, Mapping) else "array"
        return _from_collector(collector, specs, {"kind": kind}, *options)
    if callable(getattr(source, "get_next", None)):
        collector = collect_stream(reader_items(source), specs, "reader", max_samples)
        rewind = getattr(source, "rewind", None)
        if callable(rewind):
            try:
                rewind()
            except Exception as exc:  # noqa: BLE001 - a reader's rewind is optional; we hold a copy
                log.debug("reader rewind failed (%s); its data is cached", exc)
        return _from_collector(collector, specs, {"kind": "reader", "type": type(source).__name__}, *options)
    if isinstance(source, torch.utils.data.Dataset) and not isinstance(source, torch.utils.data.IterableDataset):
        if hasattr(source, "__len__"):
            return _load_dataset(source, specs, *options)
    if isinstance(source, Iterable) and not isinstance(source, (str, bytes)):
        what = "DataLoader" if isinstance(source, torch.utils.data.DataLoader) else type(source).__name__
        collector = collect_stream(iter(source), specs, what, max_samples)
        return _from_collector(collector, specs, {"kind": "iterable", "type": what}, *options)
    raise OnnxSparseError(
        f"unsupported calibration source of type {type(source).__name__}; expected a folder or .npy/.npz path, "
        "a feed dict, a CalibrationDataReader, an iterable of feed dicts, or a torch Dataset/DataLoader"
    )

def _load_path(path: Path, specs, model: onnx.ModelProto, model_path, options: tuple) -> CalibrationSet:
    """A folder of images or of .npy/.npz files, or one .npy/.npz file; ``options``: (preprocess, max_samples,
    selection_size, verify_size, seed)."""
    if not path.exists():
        raise OnnxSparseError(f"calibration source {path} does not exist")
    if path.is_dir():
        folder = scan_calibration_folder(path)
        folder.check_one_kind("calibration folder", "--calib")
        if folder.images:
            return _load_images(folder, specs, model, model_path, *options)
        if folder.tensors:
            collector = collect_files(list(folder.tensors), specs, path)
            return _from_collector(
                collector, specs, {"kind": "tensor folder", "path": str(path), "files": len(folder.tensors)}, *options
            )
        examples = ", ".join(p.name for p in folder.others[:3])
        raise OnnxSparseError(
            f"calibration folder {path} has no image files ({', '.join(IMAGE_EXTENSIONS)}) or .npy/.npz files"
            + (f"; found {len(folder.others)} other file(s), e.g. {examples}" if folder.others else "")
        )
    if path.is_file():
        if is_tensor_file(path.name):
            collector = collect_files([path], specs, path)
            return _from_collector(
                collector, specs, {"kind": path.suffix.lower().lstrip(".") + " file", "path": str(path)}, *options
            )
        if is_image_file(path.name):
            raise OnnxSparseError(
                f"calibration source {path} is a single image; --calib needs a folder of images "
                f"(at least {MIN_SAMPLES})"
            )
        raise OnnxSparseError(
            f"calibration source {path} is not a folder, .npy or .npz file (got {path.suffix or 'no extension'})"
        )
    raise OnnxSparseError(f"calibration source {path} is neither a folder nor a file")


def _warn_ignored(preprocess: PreprocessConfig, kind: str) -> list[str]:
    ignored = sorted(preprocess.given())
    if preprocess.preset not in (None, "none"):
        ignored.insert(0, "preset")
    if ignored:
        log.warning(
            "preprocessing options %s are ignored: a %s is used as given (already preprocessed)",
            ", ".join(ignored), kind,
        )
    return ignored


def _from_collector(
    collector: FeedCollector,
    specs: list[InputSpec],
    source_info: dict,
    preprocess: PreprocessConfig,
    max_samples: int | None,
    selection_size: int | None,
    verify_size: int | None,
    seed: int,
) -> CalibrationSet:
    where = source_info.get("path") or f"the {source_info['kind']}"
    n = collector.count
    sizes = _split_sizes(n, max_samples, selection_size, verify_size, where)
    arrays = collector.arrays()
    order = np.random.default_rng(seed).permutation(n)
    calib = _tensor_set(arrays, sizes.indices(order), specs, source_info, preprocess,
                        _split_info(n, sizes, seed, max_samples, selection_size, verify_size))
    _log_split(f"{n} samples from {where}", sizes, seed)
    return calib


def _log_split(what: str, sizes: SplitSizes, seed: int) -> None:
    log.info("calibration data: %s -> %d train, %d selection, %d verification (seed %d)",
             what, sizes.train, sizes.selection, sizes.verification, seed)


def _tensor_set(arrays: dict[str, np.ndarray], indices: tuple, specs: list[InputSpec],
                source_info: dict, preprocess: PreprocessConfig, split: dict) -> CalibrationSet:
    """A CalibrationSet of already-preprocessed tensors (no augmentation, nothing skipped); ``indices``: the
    train, selection and verification index sets."""
    train_index, selection_index, verification_index = indices
    return CalibrationSet(
        train={name: a[train_index] for name, a in arrays.items()},
        selection={name: a[selection_index] for name, a in arrays.items()},
        verification={name: a[verification_index] for name, a in arrays.items()},
        input_names=tuple(s.name for s in specs),
        augment=False,
        pipeline={
            "source": source_info,
            "preprocess": None,
            "ignored_options": _warn_ignored(preprocess, source_info["kind"]),
            "augment": False,
            "split": split,
            "shapes": {s.name: list(arrays[s.name].shape[1:]) for s in specs},
        },
        skipped={},
        layouts={s.name: s.layout for s in specs},
        dtypes={s.name: s.dtype for s in specs},
    )


def _load_dataset(
    dataset: Any,
    specs: list[InputSpec],
    preprocess: PreprocessConfig,
    max_samples: int | None,
    selection_size: int | None,
    verify_size: int | None,
    seed: int,
) -> CalibrationSet:
    """A map-style torch Dataset: only the items the split needs are read, in seeded order."""
    what = type(dataset).__name__
    n = len(dataset)
    sizes = _split_sizes(n, max_samples, selection_size, verify_size, f"the {what}")
    order = np.random.default_rng(seed).permutation(n)[: sizes.total]
    collector = collect_stream(dataset_items(dataset, order), specs, what, sizes.total)
    arrays = collector.arrays()
    if collector.count != sizes.total:
        raise OnnxSparseError(
            f"{what} items should each be one sample; {sizes.total} items gave {collector.count} samples"
        )
    calib = _tensor_set(arrays, sizes.slices(), specs,
                        {"kind": "torch Dataset", "type": what, "length": n}, preprocess,
                        _split_info(n, sizes, seed, max_samples, selection_size, verify_size))
    _log_split(f"{what} of {n} items", sizes, seed)
    return calib


def _load_images(
    folder: _Folder,
    specs: list[InputSpec],
    model: onnx.ModelProto,
    model_path: str | os.PathLike | None,
    preprocess: PreprocessConfig,
    max_samples: int | None,
    selection_size: int | None,
    verify_size: int | None,
    seed: int,
) -> CalibrationSet:
    if len(specs) != 1:
        raise OnnxSparseError(
            f"an image folder feeds one image input, but the model has {len(specs)} inputs "
            f"({', '.join(repr(s.name) for s in specs)}); use .npz files keyed by input name"
        )
    spec = specs[0]
    if not spec.is_float:
        raise OnnxSparseError(
            f"input {spec.name!r} is a {spec.dtype} tensor, not an image; give its calibration data as .npz/.npy "
            "files, a feed dict or a reader"
        )
    resolved = resolve_preprocess(preprocess, spec, model=model, model_path=model_path)
    n_files = len(folder.images)
    where = f"calibration folder {folder.root}"
    if n_files < MIN_SAMPLES:
        raise OnnxSparseError(
            f"{where} has {n_files} image file; calibration needs at least {MIN_SAMPLES} "
            "(one for training, one for the selection)"
        )
    cap = max(MIN_SAMPLES, DEFAULT_IMAGE_CACHE_BYTES // (4 * math.prod(resolved.sample_shape)))
    sizes = _split_sizes(n_files, max_samples, selection_size, verify_size, where, cap=cap)
    order = np.random.default_rng(seed).permutation(n_files)
    buffer = np.empty((sizes.total, *resolved.sample_shape), np.float32)
    stats = decode_files(
        [str(folder.images[i]) for i in order], resolved.plan(), sizes.total,
        lambda k, pixels: resolved.to_input(pixels, out=buffer[k]), workers=preprocess.workers,
    )
    _log_decoding(stats, folder.root)
    if stats.decoded < sizes.total:
        # Ran out of readable files: split what decoded.
        sizes = _split_sizes(stats.decoded, max_samples, selection_size, verify_size, f"{where} (readable images)")
        buffer = buffer[: sizes.total]
    pipeline = {
        "source": {"kind": "image folder", "path": str(folder.root), "files": n_files},
        "preprocess": resolved.as_dict(),
        "augment": preprocess.augment,
        "split": _split_info(n_files, sizes, seed, max_samples, selection_size, verify_size),
        "decode": {
            "workers": stats.workers,
            "images": stats.decoded,
            "seconds": round(stats.seconds, 3),
            "images_per_second": round(stats.images_per_second, 1),
        },
        "skipped": dict(stats.skipped),
    }
    _log_split(f"{stats.decoded} images from {folder.root}", sizes, seed)
    train_index, selection_index, verification_index = sizes.slices()
    return CalibrationSet(
        train={spec.name: buffer[train_index]},
        selection={spec.name: buffer[selection_index]},
        verification={spec.name: buffer[verification_index]},
        input_names=(spec.name,),
        augment=preprocess.augment,
        pipeline=pipeline,
        skipped=dict(stats.skipped),
        layouts={spec.name: resolved.layout.value},
        dtypes={spec.name: spec.dtype},
    )


def _log_decoding(stats: DecodeStats, root: Path) -> None:
    """Log the decoding speed and the skipped files; raise when no file decoded."""
    n_skipped = sum(stats.skipped.values())
    if n_skipped:
        summary = ", ".join(f"{count} {reason}" for reason, count in stats.skipped.items() if count)
        if stats.decoded == 0:
            raise OnnxSparseError(
                f"none of the {n_skipped} image files tried in {root} could be decoded ({summary}); "
                f"first: {stats.examples[0]}"
            )
        log.warning(
            "skipped %d of %d image files (%s); first: %s",
            n_skipped, n_skipped + stats.decoded, summary, "; ".join(stats.examples[:3]),
        )
    log.info(
        "decoded %d images in %.2f s (%.0f images/s, %s)",
        stats.decoded, stats.seconds, stats.images_per_second,
        f"{stats.workers} worker processes" if stats.workers else "in-process",
    )
