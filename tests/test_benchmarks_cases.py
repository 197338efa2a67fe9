"""Benchmark metrics (CTC decoding, line and map scores), the report's per-case metric tables, and the PP-OCRv4
recogniser case on two rendered lines (when rapidocr_onnxruntime and the DejaVu fonts are installed)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from benchmarks import report
from benchmarks.cases import REC_PREPROCESS, Case, load_test, read_texts, render
from benchmarks.cases.metrics import (
    MapAgreement,
    TextLines,
    ctc_greedy_decode,
    edit_distance,
    line_scores,
    map_agreement,
    model_charset,
)
from onnxsparse.errors import OnnxSparseError

CHARSET = ("", "a", "b", " ")  # blank, two characters, the appended space


def _one_hot(paths: list[list[int]], classes: int = len(CHARSET)) -> np.ndarray:
    probs = np.full((len(paths), len(paths[0]), classes), 0.01, dtype=np.float32)
    for n, path in enumerate(paths):
        for t, c in enumerate(path):
            probs[n, t, c] = 0.9
    return probs


def _identity_session(shape: list, characters: str | None = None) -> ort.InferenceSession:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 13)])
    if characters is not None:
        onnx.helper.set_model_props(model, {"character": characters})
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_ctc_greedy_decode_merges_repeats_and_drops_blanks():
    # a a _ a b b ' ' _  ->  "aab " (a blank separates the repeated a's)
    probs = _one_hot([[1, 1, 0, 1, 2, 2, 3, 0], [0, 0, 0, 0, 0, 0, 0, 0], [2, 0, 2, 2, 0, 1, 3, 3]])
    assert ctc_greedy_decode(probs, CHARSET) == ["aab ", "", "bba "]


def test_ctc_greedy_decode_rejects_a_charset_of_the_wrong_size():
    with pytest.raises(OnnxSparseError, match="5 classes per step but the character list has 4"):
        ctc_greedy_decode(np.zeros((1, 3, 5), np.float32), CHARSET)
    with pytest.raises(OnnxSparseError, match="N, T, classes"):
        ctc_greedy_decode(np.zeros((3, 4), np.float32), CHARSET)


def test_model_charset_is_blank_metadata_then_space():
    session = _identity_session([1, 2, 4], "a\nb")
    assert model_charset(session) == CHARSET
    with pytest.raises(OnnxSparseError, match="no 'character' metadata"):
        model_charset(_identity_session([1, 2, 4]))


def test_edit_distance():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("sitting", "kitten") == 3
    assert edit_distance("", "abc") == 3
    assert edit_distance("abc", "abc") == 0
    assert edit_distance("ab", "ba") == 2


def test_line_scores_normalise_whitespace_and_floor_at_zero():
    scores = line_scores(["hello  world ", "helo", "xyzxyzxyz"], ["hello world", "hello", "ab"])
    assert scores["exact"] == pytest.approx(1 / 3)
    # 1, 1 - 1/5, max(0, 1 - 9/2)
    assert scores["char"] == pytest.approx((1 + 0.8 + 0) / 3)
    with pytest.raises(OnnxSparseError, match="2 predictions for 1 labels"):
        line_scores(["a", "b"], ["a"])


def test_text_lines_metric_decodes_the_session_output():
    session = _identity_session(["N", 4, 4], "a\nb")
    probs = _one_hot([[1, 0, 2, 3], [2, 2, 1, 0], [1, 1, 1, 1]])
    metric = TextLines()
    reference = metric.reference(session, probs, ["ab", "ba", "b"])
    values = metric.measure(session, probs, reference)
    assert values["exact"] == pytest.approx(2 / 3)
    assert values["char"] == pytest.approx(2 / 3)  # "a" for "b": one substitution in one character
    assert values["lines"] == 3


def test_map_agreement_on_hand_made_maps():
    ref = np.array([[0.1, 0.5], [0.9, 0.2]])
    same = map_agreement(ref, ref, 0.3)
    assert same == {"iou": 1.0, "r2": 1.0}
    pred = np.array([[0.4, 0.5], [0.1, 0.2]])
    got = map_agreement(pred, ref, 0.3)
    # masks: pred {(0,0), (0,1)}, ref {(0,1), (1,0)}: one pixel in common of three
    assert got["iou"] == pytest.approx(1 / 3)
    sse = 0.3 ** 2 + 0.8 ** 2
    sst = float(((ref - ref.mean()) ** 2).sum())
    assert got["r2"] == pytest.approx(1 - sse / sst)
    assert map_agreement(np.zeros((2, 2)), np.zeros((2, 2)), 0.3) == {"iou": 1.0, "r2": 1.0}
    assert map_agreement(np.full((2, 2), 0.1), np.zeros((2, 2)), 0.3) == {"iou": 1.0, "r2": 0.0}
    with pytest.raises(OnnxSparseError, match="map shapes differ"):
        map_agreement(np.zeros((2, 2)), np.zeros((2, 3)), 0.3)
    with pytest.raises(OnnxSparseError, match="threshold"):
        MapAgreement(threshold=1.5)


def test_map_agreement_metric_of_the_dense_model_is_one():
    session = _identity_session(["N", 1, 4, 4])
    maps = np.random.default_rng(0).random((3, 1, 4, 4)).astype(np.float32)
    metric = MapAgreement()
    reference = metric.reference(session, maps, None)
    np.testing.assert_array_equal(reference, maps)
    assert metric.measure(session, maps, reference) == {"iou": 1.0, "r2": 1.0}
    assert metric.measure(session, maps * 0.5, reference)["r2"] < 1.0


def _results(case: dict) -> dict:
    return {"machine": {}, "invocations": [], "cases": {"x": case}}


def test_report_shows_each_case_metric():
    metric = TextLines()
    case = {
        "title": "Recogniser", "source": "rendered", "notes": [], "test_images": 200,
        "dense": {"exact": 0.915, "char": 0.9863},
        "metric": {"names": list(metric.names), "titles": metric.titles, "percent": True, "against_dense": False,
                   "description": metric.describe()},
        "runs": {
            "magnitude@0.5": {"method": "magnitude", "sparsity": 0.5, "wall_s": 30.0, "exact": 0.5, "char": 0.8},
            "unipts@0.5": {"method": "unipts", "sparsity": 0.5, "wall_s": 20.0, "error": "OnnxSparseError: no"},
        },
    }
    text = report.markdown(_results(case))
    assert "Dense exact-line accuracy **91.50%**, character accuracy 98.63% on 200 test images." in text
    assert "Exact-line accuracy (%) of the pruned model, and the wall time" in text
    assert "| magnitude (uniform) | 50.00 (30 s) |" in text
    assert "Character accuracy (%) of the pruned model:" in text
    assert "| magnitude (uniform) | 80.00 |" in text
    assert "| unipts | error |" in text
    assert "| dense | 98.63 |" in text


def test_report_detection_dense_row_is_one_and_classifiers_keep_top1():
    metric = MapAgreement()
    det = {
        "title": "Detector", "source": "rendered", "notes": [], "test_images": 50, "dense": {"iou": 1.0, "r2": 1.0},
        "metric": {"names": list(metric.names), "titles": metric.titles, "percent": False, "against_dense": True},
        "runs": {"magnitude@0.9": {"method": "magnitude", "sparsity": 0.9, "wall_s": 40.0, "iou": 0.61234,
                                   "r2": -0.25}},
    }
    text = report.markdown(_results(det))
    assert "the dense row is 1 by definition" in text
    assert "| dense | 1.0000 |" in text
    assert "| magnitude (uniform) | 0.6123 (40 s) |" in text
    assert "| magnitude (uniform) | -0.2500 |" in text
    cls = {"title": "Classifier", "source": "rendered", "notes": [], "test_images": 10, "classes": 2,
           "dense": {"top1": 0.9}, "runs": {"unipts@0.9": {"method": "unipts", "sparsity": 0.9, "wall_s": 5.0,
                                                          "top1": 0.8},
                                            "magnitude@0.9": {"method": "magnitude", "sparsity": 0.9, "wall_s": 1.0,
                                                              "top1": 0.7}}}
    text = report.markdown(_results(cls))
    assert "Dense top-1 **90.00%** on 10 test images (2 classes)." in text
    assert "Top-1 (%) of the pruned model, and the wall time" in text
    assert ("- unipts beats every other method at 0.9: 80.00 vs best other magnitude 70.00 (+10.00 points): **met**"
            in text)


def test_read_texts(tmp_path: Path):
    path = tmp_path / "labels.tsv"
    path.write_text("00000.png\tthe 12 words\n\n00001.png\tOne\n", encoding="utf-8")
    assert read_texts(path) == {"00000.png": "the 12 words", "00001.png": "One"}
    path.write_text("00000.png the\n", encoding="utf-8")
    with pytest.raises(OnnxSparseError, match="expected 'file name<TAB>text'"):
        read_texts(path)


def test_word_line_is_reproducible_and_fits():
    if not render.available_faces():
        pytest.skip("DejaVu fonts are not installed")
    img, text = render.word_line(7)
    again, same = render.word_line(7)
    assert img.size == (320, 48) and text == same and 1 <= len(text.split()) <= 4
    assert np.array_equal(np.asarray(img), np.asarray(again))
    ink = np.asarray(img.convert("L")) < 128
    assert ink.any() and not ink[:, -3:].any()  # the text ends inside the crop


@pytest.mark.skipif(importlib.util.find_spec("rapidocr_onnxruntime") is None,
                    reason="rapidocr_onnxruntime is not installed")
def test_dense_recogniser_reads_rendered_lines(tmp_path: Path):
    if not render.available_faces():
        pytest.skip("DejaVu fonts are not installed")
    package = Path(importlib.util.find_spec("rapidocr_onnxruntime").origin).parent
    model = package / "models" / "ch_PP-OCRv4_rec_infer.onnx"
    (tmp_path / "test").mkdir()
    rows = []
    for i, seed in enumerate((600_000, 600_001)):
        img, text = render.word_line(seed)
        img.save(tmp_path / "test" / f"{i:05d}.png")
        rows.append(f"{i:05d}.png\t{text}\n")
    (tmp_path / "labels.tsv").write_text("".join(rows), encoding="utf-8")
    preprocess = dataclasses.replace(REC_PREPROCESS, workers=0)
    case = Case(name="rec", title="rec", model=model, calib=tmp_path / "test", test=tmp_path / "test",
                labels=tmp_path / "labels.tsv", preprocess=preprocess, source="test", metric=TextLines(), texts=True)
    test = load_test(case)
    assert test.inputs.shape == (2, 3, 48, 320)
    assert test.labels == tuple(r.split("\t")[1].rstrip("\n") for r in rows)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    values = case.metric.measure(session, test.inputs, case.metric.reference(session, test.inputs, test.labels))
    assert values["char"] >= 0.9, json.dumps(values)


def test_unlabelled_classes_do_not_follow_the_rendering(tmp_path: Path):
    """The random class of a calibration image is independent of how the image was drawn: a class that followed
    the renderer's first random draw (the background colour) let a pruned student match its teacher on the
    calibration set by colour alone."""
    from benchmarks.cases import _write_set

    colours = {}

    def flat(seed: int):
        from PIL import Image

        colour = int(np.random.default_rng(seed).integers(185, 256))  # the renderers' first draw
        colours[seed] = colour
        return Image.new("L", (4, 4), colour)

    _write_set(tmp_path, 400, 300_000, flat, ("0", "180"), lambda img, _label: img, False)
    _write_set(tmp_path / "labelled", 4, 0, flat, ("0", "180"), lambda img, _label: img, True)
    assert sorted(p.name for p in (tmp_path / "labelled").iterdir()) == ["0", "180"]
    files = sorted(p for p in tmp_path.glob("*.png"))
    assert len(files) == 400
    # the label is not stored for unlabelled sets: recompute it the way _write_set draws it, via the rotation
    # hook, which sees the label
    labels = []
    _write_set(tmp_path / "again", 400, 300_000, flat, ("0", "180"),
               lambda img, label: labels.append(int(label == "180")) or img, False)
    seeds = [300_000 + i for i in range(400)]
    corr = np.corrcoef(labels, [colours[s] for s in seeds])[0, 1]
    assert abs(corr) < 0.2, corr
    assert 0.4 < np.mean(labels) < 0.6
