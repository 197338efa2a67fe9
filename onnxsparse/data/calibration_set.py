"""The calibration set: three disjoint splits of preprocessed tensors, and how a split is served in batches
(onnxruntime feed dicts, torch tensors on a device, one rank's shard in a torchrun run). Loading a source into
one is :mod:`onnxsparse.data.calibration`'s.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from onnxsparse.data.augment import augment_batch
from onnxsparse.errors import OnnxSparseError
from onnxsparse.validate import boolean, int_at_least, is_int, one_of

# train: what methods fit on; selection: every choice a method makes (correction, start, keep rule); verification:
# the quality gate and the report's headline agreement alone. Disjoint; methods are handed no verification samples.
SPLITS = ("train", "selection", "verification")


def check_batch_size(n_samples: int, batch_size: int, *, split: str = "train") -> None:
    """Raise if a split is too small for a step that needs full batches of ``batch_size``."""
    int_at_least(batch_size, "--batch-size")
    if n_samples < batch_size:
        raise OnnxSparseError(
            f"the calibration {split} split has {n_samples} sample(s), fewer than the batch size {batch_size}; "
            "add calibration data, lower --batch-size, or lower the selection size"
        )


@dataclass(frozen=True)
class CalibrationSet:
    """Preprocessed calibration tensors split into three disjoint parts: training, selection and verification.

    Arrays are float32 in the model's layout (integer and bool inputs: exactly their declared dtype),
    keyed by input name, in ``input_names`` order. Methods train on ``train`` and make every choice on
    ``selection``; ``verification`` is read by the quality gate alone, and :meth:`without_verification` is
    what a method is handed. Augmentation touches the training split only.
    ``layouts`` names the layout of each image input (needed to augment); ``dtypes`` holds the
    declared element type of each input (``feeds`` casts to it).
    """

    train: dict[str, np.ndarray]
    selection: dict[str, np.ndarray]
    input_names: tuple[str, ...]
    augment: bool
    pipeline: dict
    skipped: dict
    layouts: dict[str, str] = field(default_factory=dict)
    dtypes: dict[str, np.dtype] = field(default_factory=dict)
    verification: dict[str, np.ndarray] | None = None  # None: no verification samples

    def __post_init__(self) -> None:
        names = tuple(self.input_names)
        object.__setattr__(self, "input_names", names)
        if not names or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
            raise OnnxSparseError(f"input_names must be distinct strings, got {names!r}")
        if self.verification is None and isinstance(self.train, Mapping):
            object.__setattr__(self, "verification", {
                name: a[:0] for name, a in self.train.items() if isinstance(a, np.ndarray)})
        for split in SPLITS:
            arrays = getattr(self, split)
            if set(arrays) != set(names):
                raise OnnxSparseError(f"{split} has arrays for {sorted(arrays)}, expected {list(names)}")
            counts = set()
            for name in names:
                array = arrays[name]
                declared = np.dtype(self.dtypes.get(name, np.float32))
                exact = declared.kind in "iub" and isinstance(array, np.ndarray) and array.dtype == declared
                if not isinstance(array, np.ndarray) or not (array.dtype == np.float32 or exact) or array.ndim < 1:
                    raise OnnxSparseError(
                        f"{split}[{name!r}] must be a numpy array with a batch axis, float32 (or the declared "
                        f"integer dtype {declared} for an integer input), got "
                        + (f"{array.dtype} of rank {array.ndim}" if isinstance(array, np.ndarray) else type(array).__name__)
                    )
                counts.add(len(array))
            if len(counts) != 1:
                raise OnnxSparseError(f"{split} inputs have different sample counts: {sorted(counts)}")
        for name in names:
            for split in SPLITS[1:]:
                if self.train[name].shape[1:] != getattr(self, split)[name].shape[1:]:
                    raise OnnxSparseError(
                        f"train and {split} samples of {name!r} differ in shape: "
                        f"{self.train[name].shape[1:]} vs {getattr(self, split)[name].shape[1:]}"
                    )
        boolean(self.augment, "augment")
        if self.augment and not (len(names) == 1 and self.layouts.get(names[0]) in ("nchw", "nhwc")):
            raise OnnxSparseError("augmentation needs exactly one image input with a known layout (nchw or nhwc)")
        try:
            json.dumps(self.pipeline)
        except (TypeError, ValueError) as exc:
            raise OnnxSparseError(f"pipeline must be JSON-serialisable: {exc}") from None

    @property
    def n_train(self) -> int:
        return len(self.train[self.input_names[0]])

    @property
    def n_selection(self) -> int:
        return len(self.selection[self.input_names[0]])

    @property
    def n_verification(self) -> int:
        return len(self.verification[self.input_names[0]])

    def without_verification(self) -> CalibrationSet:
        """This set with an empty verification split: what a method (anything that decides) is handed."""
        return dataclasses.replace(self, verification={n: a[:0] for n, a in self.verification.items()})

    def _arrays(self, split: str) -> dict[str, np.ndarray]:
        return getattr(self, one_of(split, "split", SPLITS))

    def check_batch_size(self, batch_size: int, split: str = "train") -> None:
        """Raise if ``split`` has fewer samples than ``batch_size``."""
        check_batch_size(len(self._arrays(split)[self.input_names[0]]), batch_size, split=split)

    def batches(
        self,
        split: str,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        augment: bool = False,
        flip: bool = True,
        device: torch.device | str = "cpu",
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        resident: dict[str, torch.Tensor] | None = None,
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        """Batches of torch tensors in ``input_names`` order, on ``device``.

        ``shuffle`` permutes the order with ``seed``; augmentation applies when ``augment`` is True,
        the set allows it (``self.augment``) and the split is "train" (never the selection); ``flip`` adds the
        horizontal flip to the crop (off for models whose outputs a mirrored input changes). With
        ``world_size`` > 1 the (shuffled) order is padded by wrapping around to a multiple of
        ``world_size`` and rank ``rank`` takes every ``world_size``-th sample, so all ranks get the
        same number of batches. ``resident`` (from :meth:`resident`) serves the same batches by indexing
        tensors already on ``device`` instead of gathering and copying from the host.
        """
        arrays = self._arrays(split)
        int_at_least(batch_size, "batch_size")
        device = torch.device(device)
        order = shard_order(len(arrays[self.input_names[0]]), shuffle=shuffle, seed=seed, rank=rank,
                            world_size=world_size)
        use_augment = bool(augment) and self.augment and split == "train"
        generator = None
        if use_augment:
            generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))
        pin = device.type == "cuda"
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            if drop_last and len(index) < batch_size:
                break
            tensors = []
            for name in self.input_names:
                if resident is not None:
                    tensor = resident[name][torch.from_numpy(index).to(resident[name].device)]
                elif pin:
                    tensor = torch.from_numpy(arrays[name][index]).pin_memory().to(device, non_blocking=True)
                else:
                    tensor = torch.from_numpy(arrays[name][index]).to(device)
                if generator is not None:
                    tensor = augment_batch(tensor, generator, self.layouts[name], flip=flip)
                tensors.append(tensor)
            yield tuple(tensors)

    def resident(self, split: str, device: torch.device | str, max_bytes: int) -> dict[str, torch.Tensor] | None:
        """The whole ``split`` as tensors on ``device`` for :meth:`batches`, or None above ``max_bytes``."""
        arrays = self._arrays(split)
        if sum(a.nbytes for a in arrays.values()) > max_bytes:
            return None
        return {name: torch.from_numpy(arrays[name]).to(device) for name in self.input_names}

    def feeds(self, split: str, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """onnxruntime feed dicts in stored order, cast to each input's declared dtype, no augmentation."""
        int_at_least(batch_size, "batch_size")
        return feed_batches(self._arrays(split), self.dtypes, batch_size)


def feed_batches(arrays: dict[str, np.ndarray], dtypes: dict[str, np.dtype],
                 batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Feed dicts of ``batch_size`` samples in stored order, each input cast to its dtype (default float32)."""
    n = len(next(iter(arrays.values())))
    for start in range(0, n, batch_size):
        yield {name: a[start : start + batch_size].astype(dtypes.get(name, np.float32), copy=False)
               for name, a in arrays.items()}


def shard_order(n: int, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """The sample indices rank ``rank`` reads, in order: all ``n`` (permuted with ``seed`` when ``shuffle``), or
    with ``world_size`` > 1 every ``world_size``-th of them after padding by wrapping around to a multiple of
    ``world_size``, so every rank gets the same number of samples."""
    if not is_int(world_size) or world_size < 1 or not is_int(rank) or not 0 <= rank < world_size:
        raise OnnxSparseError(f"rank must be in 0..world_size-1 with world_size >= 1, got {rank}/{world_size}")
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    if world_size > 1 and n > 0:
        order = np.resize(order, math.ceil(n / world_size) * world_size)[rank::world_size]
    return order
