"""Already-preprocessed tensor sources: .npy/.npz files, feed dicts, readers, torch datasets."""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from onnxsparse.data.spec import InputSpec
from onnxsparse.errors import OnnxSparseError

log = logging.getLogger(__name__)

TENSOR_EXTENSIONS = (".npy", ".npz")


def is_tensor_file(name: str) -> bool:
    return name.lower().endswith(TENSOR_EXTENSIONS)


def _to_numpy(value: Any, where: str, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        return tensor.cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise OnnxSparseError(f"{where}: input {name!r} is not an array ({type(value).__name__}): {exc}") from None
    if array.dtype == object:
        raise OnnxSparseError(
            f"{where}: input {name!r} is a {type(value).__name__} that is not a numeric array"
        )
    return array


class FeedCollector:
    """Accumulates feeds (sample or batch per input), checked against the model's inputs."""

    def __init__(self, specs: list[InputSpec]) -> None:
        self.specs = specs
        self.parts: dict[str, list[np.ndarray]] = {s.name: [] for s in specs}
        self.sources: list[str] = []
        self.count = 0
        self._warned: set[str] = set()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)

    def add_item(self, item: Any, where: str) -> int:
        """Add one feed dict, array, or (inputs..., extras) tuple; returns its sample count."""
        return self.add(self.to_feed(item, where), where)

    def to_feed(self, item: Any, where: str) -> dict[str, Any]:
        names = [s.name for s in self.specs]
        if isinstance(item, Mapping):
            keys = [str(k) for k in item]
            if len(names) == 1 and names[0] not in item and len(item) == 1:
                self._warn_once(
                    "renamed", f"{where}: using the only array {keys[0]!r} as input {names[0]!r}"
                )
                return {names[0]: next(iter(item.values()))}
            missing = [n for n in names if n not in item]
            if missing:
                raise OnnxSparseError(
                    f"{where} has no entry for input(s) {', '.join(map(repr, missing))}; it has "
                    f"{', '.join(map(repr, keys)) or 'no keys'}, the model's inputs are {', '.join(map(repr, names))}"
                )
            extra = [k for k in keys if k not in names]
            if extra:
                self._warn_once(
                    "extra", f"{where}: ignoring entries that are not model inputs: {', '.join(map(repr, extra))}"
                )
            return {n: item[n] for n in names}
        if isinstance(item, (np.ndarray, torch.Tensor)):
            if len(names) != 1:
                raise OnnxSparseError(
                    f"{where} is a single array but the model has {len(names)} inputs ({', '.join(map(repr, names))}); "
                    "give a dict keyed by input name"
                )
            return {names[0]: item}
        if isinstance(item, (tuple, list)):
            if len(item) < len(names):
                raise OnnxSparseError(
                    f"{where} is a {type(item).__name__} of {len(item)} element(s) but the model has {len(names)} "
                    f"inputs ({', '.join(map(repr, names))})"
                )
            if len(item) > len(names):
                self._warn_once(
                    "tuple",
                    f"{where}: using the first {len(names)} element(s) of each item as the model input(s) "
                    f"{', '.join(map(repr, names))}; ignoring {len(item) - len(names)} more (labels?)",
                )
            return dict(zip(names, item))
        raise OnnxSparseError(
            f"{where} is a {type(item).__name__}; expected a dict of input name -> array, an array, or a tuple"
        )

    def add(self, feed: Mapping[str, Any], where: str) -> int:
        batch = {spec.name: self._check(spec, _to_numpy(feed[spec.name], where, spec.name), where)
                 for spec in self.specs}
        counts = {name: len(a) for name, a in batch.items()}
        if len(set(counts.values())) > 1:
            raise OnnxSparseError(
                f"{where}: inputs have different batch sizes: "
                + ", ".join(f"{name} {n}" for name, n in counts.items())
            )
        for name, array in batch.items():
            self.parts[name].append(array)
        self.sources.append(where)
        n = next(iter(counts.values()))
        self.count += n
        return n

    def _check(self, spec: InputSpec, array: np.ndarray, where: str) -> np.ndarray:
        if spec.is_integer:
            if array.dtype.kind not in "iub":
                raise OnnxSparseError(
                    f"{where}: input {spec.name!r} has dtype {array.dtype}; the model declares it {spec.dtype} "
                    "(ids, masks), so give integer or bool arrays"
                )
        elif array.dtype.kind != "f":
            raise OnnxSparseError(
                f"{where}: input {spec.name!r} has dtype {array.dtype}; calibration tensors must be floating "
                "point (float16, float32 or float64) and already preprocessed"
            )
        rank = spec.rank
        if rank is None:
            if array.ndim == 0:
                raise OnnxSparseError(f"{where}: input {spec.name!r} is a scalar; expected a batch of samples")
            batch = array
        elif array.ndim == rank:
            batch = array
        elif array.ndim == rank - 1 and rank >= 1:
            batch = array[None]
        else:
            raise OnnxSparseError(
                f"{where}: input {spec.name!r} has shape {tuple(array.shape)}; the model declares "
                f"{spec.describe_shape()}, so give one sample of rank {rank - 1} or a batch of rank {rank}"
            )
        if rank is not None:
            for axis in range(1, rank):
                want = spec.shape[axis]
                if want is not None and batch.shape[axis] != want:
                    raise OnnxSparseError(
                        f"{where}: input {spec.name!r} has shape {tuple(batch.shape)} (as a batch) but the model "
                        f"declares {spec.describe_shape()}: dimension {axis} is {batch.shape[axis]}, expected {want}"
                    )
        if spec.is_integer:
            return _exact_integers(spec, batch, where)
        with np.errstate(over="ignore", invalid="ignore"):
            # Overflow to inf is reported just below, with the input's name.
            converted = batch.astype(np.float32, copy=False)
        finite = np.isfinite(converted)
        if not finite.all():
            bad = int(converted.size - np.count_nonzero(finite))
            first = int(np.argmin(finite.reshape(len(converted), -1).all(axis=1)))
            raise OnnxSparseError(
                f"{where}: input {spec.name!r} has {bad} NaN/Inf value(s)"
                + (" after conversion to float32" if converted.dtype != batch.dtype else "")
                + f" (first in sample {first}); calibration tensors must be finite"
            )
        return converted

    def arrays(self) -> dict[str, np.ndarray]:
        """Everything added, concatenated per input."""
        result = {}
        for spec in self.specs:
            parts = self.parts[spec.name]
            if not parts:
                result[spec.name] = np.empty((0,), np.float32)
                continue
            first = parts[0].shape[1:]
            for part, where in zip(parts, self.sources):
                if part.shape[1:] != first:
                    raise OnnxSparseError(
                        f"{where}: input {spec.name!r} samples have shape {tuple(part.shape[1:])}, but "
                        f"{self.sources[0]} has {tuple(first)}; all samples of an input must have one shape"
                    )
            result[spec.name] = np.concatenate(parts, axis=0) if len(parts) > 1 else np.ascontiguousarray(parts[0])
        return result


def _exact_integers(spec: InputSpec, batch: np.ndarray, where: str) -> np.ndarray:
    """``batch`` in the declared integer dtype, refusing values that dtype cannot hold (no wrap-around)."""
    if batch.dtype == spec.dtype:
        return batch
    if spec.dtype == np.bool_:
        if batch.size and not np.isin(batch, (0, 1)).all():
            raise OnnxSparseError(f"{where}: input {spec.name!r} is declared bool but holds values other than 0 and 1")
        return batch.astype(np.bool_)
    if batch.size and not np.can_cast(batch.dtype, spec.dtype):
        info = np.iinfo(spec.dtype)
        low, high = int(batch.min()), int(batch.max())
        if low < info.min or high > info.max:
            raise OnnxSparseError(
                f"{where}: input {spec.name!r} holds values in [{low}, {high}], outside the range of its declared "
                f"dtype {spec.dtype} [{info.min}, {info.max}]"
            )
    return batch.astype(spec.dtype)


def _load(path: Path, archive: bool) -> np.ndarray | dict[str, np.ndarray]:
    """``path`` as a .npy array or, with ``archive``, a .npz archive's arrays; pickled data is never loaded."""
    what = ".npz archive" if archive else ".npy array"
    try:
        loaded = np.load(path, allow_pickle=False)
        if not archive:
            return loaded
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise OnnxSparseError(f"{path} is a .npy array, not a .npz archive; rename it to .npy")
        with loaded:
            return {key: loaded[key] for key in loaded.files}
    except ValueError as exc:
        if "Object arrays" in str(exc):
            raise OnnxSparseError(f"{path} holds Python objects; only numeric arrays are supported") from None
        if "pickled data" in str(exc):
            raise OnnxSparseError(
                f"cannot read {path} as a {what}: it is neither .npy nor .npz (pickled files are not loaded)"
            ) from None
        raise OnnxSparseError(f"cannot read {path} as a {what}: {exc}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise OnnxSparseError(f"cannot read {path} as a {what}: {exc}") from None


def collect_files(paths: list[Path], specs: list[InputSpec], root: Path) -> FeedCollector:
    """Load .npy (single-input models) and .npz files (keyed by input name)."""
    collector = FeedCollector(specs)
    names = [s.name for s in specs]
    for path in paths:
        where = str(path.relative_to(root)) if path != root and root in path.parents else str(path)
        if path.suffix.lower() == ".npy":
            if len(specs) != 1:
                raise OnnxSparseError(
                    f"{where}: a .npy file feeds one input, but the model has {len(specs)} inputs "
                    f"({', '.join(map(repr, names))}); use .npz files keyed by input name"
                )
            collector.add({names[0]: _load(path, archive=False)}, where)
        else:
            arrays = _load(path, archive=True)
            if not arrays:
                raise OnnxSparseError(f"{where} is an empty .npz archive")
            collector.add(collector.to_feed(arrays, where), where)
    return collector


def collect_stream(
    items: Iterable[Any], specs: list[InputSpec], what: str, limit: int | None
) -> FeedCollector:
    """Read items (feed dicts, arrays or tuples) until exhausted or ``limit`` samples are collected."""
    collector = FeedCollector(specs)
    for index, item in enumerate(items):
        if item is None:
            break
        collector.add_item(item, f"{what} item {index}")
        if limit is not None and collector.count >= limit:
            log.info("stopped reading %s after %d samples (max_samples)", what, collector.count)
            break
    return collector


def reader_items(reader: Any) -> Iterator[Any]:
    """Items of an onnxruntime CalibrationDataReader-like object: get_next() until None."""
    while True:
        item = reader.get_next()
        if item is None:
            return
        yield item


def dataset_items(dataset: Any, indices: Iterable[int]) -> Iterator[Any]:
    for index in indices:
        yield dataset[int(index)]
