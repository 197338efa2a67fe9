"""Activation calibration for static int8 quantization: onnxruntime's calibrators fed from feed dicts.

The ranges of one method are computed once and kept in a cache file per method, so that every candidate
quantization of the same float model (other op types, layers kept in float) reuses them instead of running
the calibration data through the model again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod

from onnxsparse.errors import OnnxSparseError
from onnxsparse.validate import one_of

logger = logging.getLogger(__name__)

# Candidate activation calibration methods, in order of preference on a tie (MinMax: cheapest, no histogram).
# Percentile keeps the 99.999th percentile of each activation's magnitude; Entropy minimises the KL divergence
# between the float histogram and its quantized form.
METHODS: dict[str, CalibrationMethod] = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
}


class FeedReader(CalibrationDataReader):
    """onnxruntime's one-method ``CalibrationDataReader`` protocol over a list of feed dicts."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._feeds = list(feeds)
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self._feeds):
            return None
        feed = self._feeds[self._next]
        self._next += 1
        return feed

    def __len__(self) -> int:
        return len(self._feeds)


class Calibration:
    """Calibration feeds and one range cache per method, in ``workdir`` (a folder the caller owns)."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]], workdir: str | Path) -> None:
        self.feeds = list(feeds)
        if not self.feeds:
            raise OnnxSparseError("int8 quantization needs calibration samples; the calibration split is empty")
        self.workdir = Path(workdir)

    @property
    def samples(self) -> int:
        return sum(int(next(iter(feed.values())).shape[0]) for feed in self.feeds)

    def cache(self, method: str) -> Path:
        """The range cache of ``method``; quantize_static fills it on first use and reads it afterwards."""
        one_of(method, "calibration method", tuple(METHODS))
        return self.workdir / f"ranges-{method}.json"

    def reader(self, method: str) -> FeedReader | None:
        """The feeds for a first calibration with ``method``; None once its ranges are cached."""
        return None if self.cache(method).is_file() else FeedReader(self.feeds)
