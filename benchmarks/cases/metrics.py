"""How a benchmark case scores a model on its test set.

A metric names the values it reports (the first is the case's main metric, shown in the results table with
the wall time; the others get tables of their own) and measures an onnxruntime session on the preprocessed
test inputs against a *reference*: the labels for the classifiers and the text recogniser, the dense model's
own outputs for the detector (whose pages have no ground truth: the pruned map is compared with the dense one).

* :class:`TopOne` - top-1 (and top-5) accuracy of a classifier (``onnxsparse.evaluate.accuracy_of``).
* :class:`TextLines` - exact-line and character accuracy of a CTC text recogniser after greedy decoding with
  the model's own character list.
* :class:`MapAgreement` - IoU of the thresholded probability maps and R^2 of a dense-output model against the
  dense model's maps.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import onnxruntime as ort

from onnxsparse.errors import OnnxSparseError

BATCH = 50  # test inputs per session run: keeps the (N, T, 6625) recogniser output small


class Metric(Protocol):
    names: tuple[str, ...]  # the values shown, main first; ``measure`` returns at least these keys
    percent: bool  # values in [0, 1] shown as percentages (else as ratios with 4 decimals)
    against_dense: bool  # the reference is the dense model's outputs: the dense row is 1 by definition

    @property
    def titles(self) -> dict[str, str]:
        """A short title per name, for the tables."""

    def reference(self, dense: ort.InferenceSession, inputs: np.ndarray, labels: Any) -> Any:
        """What ``measure`` compares a model's outputs with (labels, or the dense model's outputs)."""

    def measure(self, session: ort.InferenceSession, inputs: np.ndarray, reference: Any) -> dict[str, Any]:
        """The metric values of ``session`` on ``inputs``."""

    def describe(self) -> str:
        """One sentence on how the values are computed, for the results page."""


def first_outputs(session: ort.InferenceSession, inputs: np.ndarray, batch: int = BATCH) -> Iterator[np.ndarray]:
    """The session's first output, batch by batch, in input order (the model has one input)."""
    feeds = session.get_inputs()
    if len(feeds) != 1:
        raise OnnxSparseError(f"expected a model with one input, got {len(feeds)}")
    name = feeds[0].name
    output = session.get_outputs()[0].name
    for i in range(0, len(inputs), batch):
        yield np.asarray(session.run([output], {name: inputs[i:i + batch]})[0])


@dataclass(frozen=True)
class TopOne:
    names: ClassVar[tuple[str, ...]] = ("top1",)
    percent: ClassVar[bool] = True
    against_dense: ClassVar[bool] = False

    @property
    def titles(self) -> dict[str, str]:
        return {"top1": "top-1"}

    def reference(self, dense: ort.InferenceSession, inputs: np.ndarray, labels: Any) -> np.ndarray:
        return np.asarray(labels)

    def measure(self, session: ort.InferenceSession, inputs: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
        from onnxsparse.evaluate import accuracy_of

        return accuracy_of(session, inputs, reference)

    def describe(self) -> str:
        return "top-1 accuracy on the labelled test images"


# ---------------------------------------------------------------------------------------------
# Text recognition (CTC)


def model_charset(session: ort.InferenceSession, key: str = "character") -> tuple[str, ...]:
    """The CTC classes of a PaddleOCR recogniser: blank, the characters of its ``key`` metadata (one per line),
    then a space (rapidocr's CTCLabelDecode: blank at index 0, the space appended last)."""
    meta = session.get_modelmeta().custom_metadata_map
    if key not in meta:
        raise OnnxSparseError(f"the model has no {key!r} metadata (keys: {', '.join(sorted(meta)) or 'none'})")
    return ("", *meta[key].splitlines(), " ")


def ctc_greedy_decode(probs: np.ndarray, charset: Sequence[str], blank: int = 0) -> list[str]:
    """Best-path CTC decoding of ``probs`` (N, T, C): argmax per step, repeats merged, blanks dropped."""
    if probs.ndim != 3:
        raise OnnxSparseError(f"CTC decoding needs (N, T, classes) scores, got shape {list(probs.shape)}")
    if probs.shape[2] != len(charset):
        raise OnnxSparseError(
            f"the model scores {probs.shape[2]} classes per step but the character list has {len(charset)}"
        )
    texts = []
    for path in probs.argmax(axis=2):
        keep = np.ones(len(path), dtype=bool)
        keep[1:] = path[1:] != path[:-1]
        keep &= path != blank
        texts.append("".join(charset[i] for i in path[keep]))
    return texts


def normalise_text(text: str) -> str:
    """Runs of whitespace as one space, none at the ends (the recogniser often ends a line with a space)."""
    return " ".join(text.split())


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions of one character each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def line_scores(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Exact-line accuracy and character accuracy (mean over lines of max(0, 1 - edit distance / label
    length)), both on whitespace-normalised text."""
    if len(predictions) != len(labels):
        raise OnnxSparseError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        raise OnnxSparseError("no labelled text lines to score")
    exact = 0
    chars = 0.0
    for pred, label in zip(predictions, labels):
        p, t = normalise_text(pred), normalise_text(label)
        if not t:
            raise OnnxSparseError("a label is empty: every test line must hold text")
        exact += p == t
        chars += max(0.0, 1.0 - edit_distance(p, t) / len(t))
    return {"exact": exact / len(labels), "char": chars / len(labels)}


@dataclass(frozen=True)
class TextLines:
    names: ClassVar[tuple[str, ...]] = ("exact", "char")
    percent: ClassVar[bool] = True
    against_dense: ClassVar[bool] = False

    @property
    def titles(self) -> dict[str, str]:
        return {"exact": "exact-line accuracy", "char": "character accuracy"}

    def reference(self, dense: ort.InferenceSession, inputs: np.ndarray, labels: Any) -> tuple[str, ...]:
        return tuple(labels)

    def measure(self, session: ort.InferenceSession, inputs: np.ndarray,
                reference: tuple[str, ...]) -> dict[str, Any]:
        charset = model_charset(session)
        predictions: list[str] = []
        for probs in first_outputs(session, inputs):
            predictions += ctc_greedy_decode(probs, charset)
        return {**line_scores(predictions, reference), "lines": len(reference)}

    def describe(self) -> str:
        return ("greedy CTC decoding with the model's own character list (metadata `character`, blank first, "
                "space last); exact-line accuracy and character accuracy (mean of max(0, 1 - edit distance / "
                "label length)) on whitespace-normalised text")


# ---------------------------------------------------------------------------------------------
# Dense maps (text detection)


def map_agreement(pred: np.ndarray, ref: np.ndarray, threshold: float) -> dict[str, float]:
    """IoU of ``pred > threshold`` with ``ref > threshold`` and R^2 = 1 - SSE/SST of ``pred`` against ``ref``,
    both pooled over every element. Two empty masks have IoU 1; a constant ``ref`` has R^2 1 when matched
    exactly, else 0."""
    if pred.shape != ref.shape:
        raise OnnxSparseError(f"map shapes differ: {list(pred.shape)} vs {list(ref.shape)}")
    p = pred.astype(np.float64)
    r = ref.astype(np.float64)
    a, b = p > threshold, r > threshold
    union = int(np.logical_or(a, b).sum())
    iou = 1.0 if union == 0 else int(np.logical_and(a, b).sum()) / union
    sse = float(((p - r) ** 2).sum())
    sst = float(((r - r.mean()) ** 2).sum())
    r2 = (1.0 if sse == 0 else 0.0) if sst == 0 else 1.0 - sse / sst
    return {"iou": iou, "r2": r2}


@dataclass(frozen=True)
class MapAgreement:
    threshold: float = 0.3
    names: ClassVar[tuple[str, ...]] = ("iou", "r2")
    percent: ClassVar[bool] = False
    against_dense: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise OnnxSparseError(f"threshold must be in (0, 1), got {self.threshold!r}")

    @property
    def titles(self) -> dict[str, str]:
        return {"iou": f"IoU at {self.threshold:g}", "r2": "R²"}

    def reference(self, dense: ort.InferenceSession, inputs: np.ndarray, labels: Any) -> np.ndarray:
        return np.concatenate(list(first_outputs(dense, inputs)))

    def measure(self, session: ort.InferenceSession, inputs: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
        pred = np.concatenate(list(first_outputs(session, inputs)))
        return map_agreement(pred, reference, self.threshold)

    def describe(self) -> str:
        return (f"agreement with the dense model's probability maps on the test pages: IoU of the maps "
                f"thresholded at {self.threshold:g} and R² = 1 - SSE/SST, pooled over every pixel")
