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


# -- provenance and the onnxsim peers ------------------------------------------------------------------------


def _git(repo: Path, *args: str) -> str:
    import subprocess

    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          capture_output=True, text=True, check=True).stdout


def test_git_state_names_head_and_ignores_the_benchmark_outputs(tmp_path: Path):
    from benchmarks.provenance import GitState, git_state

    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    (repo / "code.py").write_text("x = 1\n")
    (repo / "benchmarks" / "results.json").write_text("{}\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "one")
    head = _git(repo, "rev-parse", "HEAD").strip()
    assert git_state(repo) == GitState(head, False)
    (repo / "benchmarks" / "results.json").write_text('{"rows": 1}\n')  # the run's own output
    assert git_state(repo) == GitState(head, False)
    (repo / "code.py").write_text("x = 2\n")
    state = git_state(repo)
    assert state == GitState(head, True) and state.label() == head[:7] + "+dirty"
    assert git_state(tmp_path / "not-a-repo").commit is None


def test_row_provenance_records_config_machine_threads_versions_and_date():
    import os

    from benchmarks.provenance import Environment, row_label, row_provenance
    from onnxsparse.config import PruneConfig

    env = Environment.capture(threads=3)
    config = PruneConfig(sparsity=0.7, method="magnitude", pattern="2:4")
    row = row_provenance(env, config.as_dict())
    assert row["commit"] == env.git.commit and row["dirty"] == env.git.dirty
    assert row["config"]["sparsity"] == 0.7 and row["config"]["pattern"] == "2:4"
    assert row["config"]["method"] == "magnitude" and "unipts" in row["config"]
    assert row["machine"]["cores"] == os.cpu_count() and row["machine"]["cpu"]
    assert row["threads"] == 3
    assert row["versions"]["torch"] and row["versions"]["onnxruntime"] and row["versions"]["onnx"]
    assert row["versions"]["python"].count(".") == 2
    assert row["date"].endswith("+00:00")
    json.dumps(row)  # results.json takes it as it is
    assert row_label({"commit": "0123456789", "dirty": False}) == "0123456"
    assert row_label({"method": "x"}) == "unrecorded"


def _tiny_classifier() -> onnx.ModelProto:
    """Conv 1->6 3x3, ReLU, global pooling, Gemm 6->2: 54 + 12 prunable weights."""
    rng = np.random.default_rng(0)
    inits = [
        onnx.numpy_helper.from_array(rng.standard_normal((6, 1, 3, 3)).astype(np.float32), "conv.w"),
        onnx.numpy_helper.from_array(rng.standard_normal(6).astype(np.float32) * 0.1, "conv.b"),
        onnx.numpy_helper.from_array(rng.standard_normal((2, 6)).astype(np.float32), "fc.w"),
        onnx.numpy_helper.from_array(np.zeros(2, np.float32), "fc.b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="pool"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


needs_onnxsim = pytest.mark.skipif(importlib.util.find_spec("onnxsim") is None, reason="onnxsim is not installed")


@needs_onnxsim
@pytest.mark.parametrize("method", ["onnxsim-magnitude", "onnxsim-wanda", "onnxsim-sparsegpt"])
def test_peer_prunes_a_tiny_graph_to_the_target(method: str, tmp_path: Path):
    from benchmarks import peers

    model = _tiny_classifier()
    before = model.SerializeToString()
    feeds = [{"x": np.random.default_rng(i).standard_normal((4, 1, 8, 8)).astype(np.float32)} for i in range(3)]
    pruned = peers.run_peer(method, model, 0.5, feeds)
    assert model.SerializeToString() == before  # the dense model is not touched
    path = tmp_path / "pruned.onnx"
    onnx.save(pruned, str(path))
    peers.check_runs(path, feeds, threads=1)
    counted = peers.prunable_sparsity(model, pruned, 0.5)
    assert (counted.params, counted.layers) == (54 + 12, 2)
    assert counted.reaches(0.5) and counted.achieved < 0.6, counted
    assert counted.as_dict(0.5)["reaches_target"] is True
    # the same count on the dense model: nothing pruned, flagged
    dense = peers.prunable_sparsity(model, model, 0.5)
    assert dense.zeros == 0 and not dense.reaches(0.5) and dense.below_target == 2
    config = peers.peer_config(method, 0.5, 12, 4)
    assert config["kwargs"]["sparsity"] == 0.5 and config["function"].startswith("onnxsim.apply_")
    assert ("calibration" in config) == (method != "onnxsim-magnitude")


@needs_onnxsim
def test_peer_output_that_onnxruntime_cannot_run_is_an_error(tmp_path: Path):
    from benchmarks import peers

    model = _tiny_classifier()
    model.graph.node[0].op_type = "NoSuchOp"
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    with pytest.raises(Exception, match="NoSuchOp"):
        peers.check_runs(path, [{"x": np.zeros((1, 1, 8, 8), np.float32)}], threads=1)
    with pytest.raises(OnnxSparseError, match="needs calibration samples"):
        peers.run_peer("onnxsim-wanda", _tiny_classifier(), 0.5, [])
    with pytest.raises(OnnxSparseError, match="unknown peer"):
        peers.peer_function("onnxsim-nothing")


def _tiny_case(tmp_path: Path) -> Case:
    from PIL import Image

    from onnxsparse.data import PreprocessConfig

    model = tmp_path / "tiny.onnx"
    onnx.save(_tiny_classifier(), str(model))
    rng = np.random.default_rng(1)
    for i in range(40):
        (tmp_path / "calib").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "calib" / f"{i:03d}.png")
    for label in ("a", "b"):
        (tmp_path / "test" / label).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "test" / label / f"{i}.png")
    (tmp_path / "labels.txt").write_text("a\nb\n")
    return Case(name="tiny", title="tiny", model=model, calib=tmp_path / "calib", test=tmp_path / "test",
                labels=tmp_path / "labels.txt", source="test",
                preprocess=PreprocessConfig(input_size=(8, 8), scale=1 / 255, channel_order="gray", workers=0))


@needs_onnxsim
def test_run_case_rows_carry_provenance_and_peer_columns(tmp_path: Path, monkeypatch):
    import benchmarks.cases
    from benchmarks import peers, run
    from benchmarks.provenance import Environment

    case = _tiny_case(tmp_path)
    monkeypatch.setattr(benchmarks.cases, "get_case", lambda name: case)
    real = peers.run_peer

    def failing(method, model, sparsity, feeds):
        if method == "onnxsim-sparsegpt":
            raise RuntimeError("peer broke")
        return real(method, model, sparsity, feeds)

    monkeypatch.setattr(peers, "run_peer", failing)
    results: dict = {"cases": {}}
    env = Environment.capture(threads=1)
    (tmp_path / "work").mkdir()
    run.run_case("tiny", (0.5,), ("magnitude", "onnxsim-magnitude", "onnxsim-wanda", "onnxsim-sparsegpt"), seed=0,
                 threads=1, results=results, save=lambda: None, work=tmp_path / "work", unipts_budget=None, env=env)
    runs = results["cases"]["tiny"]["runs"]
    assert set(runs) == {"magnitude@0.5", "onnxsim-magnitude@0.5", "onnxsim-wanda@0.5", "onnxsim-sparsegpt@0.5"}
    for row in runs.values():
        assert row["commit"] == env.git.commit and row["threads"] == 1 and row["versions"]["onnxruntime"]
        assert row["machine"]["cores"] and row["date"] and row["config"]["sparsity"] == 0.5
    assert runs["magnitude@0.5"]["config"]["method"] == "magnitude" and "top1" in runs["magnitude@0.5"]
    ours_train = runs["magnitude@0.5"]["calibration"]
    for method in ("onnxsim-magnitude", "onnxsim-wanda"):
        row = runs[f"{method}@0.5"]
        assert "error" not in row, row.get("error")
        assert row["peer"]["reaches_target"] and row["peer"]["layers"] == 2 and "top1" in row
        assert row["config"]["function"].startswith("onnxsim.apply_")
    assert runs["onnxsim-wanda@0.5"]["config"]["calibration"]["samples"] == ours_train  # our training split
    broken = runs["onnxsim-sparsegpt@0.5"]
    assert broken["error"] == "RuntimeError: peer broke" and "top1" not in broken
    assert broken["config"]["method"] == "onnxsim-sparsegpt"
    assert not list((tmp_path / "work").iterdir())  # pruned files are removed, failed or not


def test_report_names_commits_and_flags_peers_below_target():
    def row(method: str, commit: str | None, date: str, top1: float, **extra) -> dict:
        base = {"method": method, "sparsity": 0.5, "wall_s": 2.0, "top1": top1, "date": date, **extra}
        return base if commit is None else {**base, "commit": commit, "dirty": False}

    runs = {
        "magnitude@0.5": row("magnitude", "aaaaaaa111", "2026-12-01T10:00:00+00:00", 0.8),
        "unipts@0.5": row("unipts", "bbbbbbb222", "2026-12-02T10:00:00+00:00", 0.9),
        "reconstruct@0.5": row("reconstruct", None, "2026-11-20T10:00:00+00:00", 0.85),
        "onnxsim-wanda@0.5": row("onnxsim-wanda", "bbbbbbb222", "2026-12-02T11:00:00+00:00", 0.7,
                                 peer={"achieved_sparsity": 0.31, "reaches_target": False, "prunable_params": 66,
                                       "layers": 2}),
        "onnxsim-sparsegpt@0.5": row("onnxsim-sparsegpt", "bbbbbbb222", "2026-12-02T12:00:00+00:00", 0.75,
                                     peer={"achieved_sparsity": 0.5, "reaches_target": True, "prunable_params": 66,
                                           "layers": 2}),
    }
    case = {"title": "Classifier", "source": "rendered", "notes": [], "test_images": 10, "classes": 2,
            "dense": {"top1": 0.95}, "runs": runs}
    text = report.markdown(_results(case))
    assert "| unipts | 90.00 (2 s) |" in text  # the newest commit: unmarked
    assert "| magnitude (uniform) | 80.00 (2 s) [aaaaaaa] |" in text
    assert "| reconstruct (SparseGPT-style) | 85.00 (2 s) [unrecorded] |" in text
    assert "| onnxsim Wanda | 70.00 (2 s) **below target: 0.310** |" in text
    assert "| onnxsim SparseGPT | 75.00 (2 s) |" in text
    assert "Code: commit `bbbbbbb` (2026-12-02); a cell marked [other]" in text
    assert "- [aaaaaaa]: 1 cell(s), commit `aaaaaaa` (2026-12-01)" in text
    assert "- [unrecorded]: 1 cell(s), rows written before rows recorded their commit" in text
    assert "| onnxsim Wanda | 0.3100 **below target** |" in text
    assert "| onnxsim SparseGPT | 0.5000 |" in text
    assert "(66 weights in 2 layers)" in text


def test_mcnemar_exact_and_paired_counts():
    from benchmarks.paired import compare, mcnemar_exact, right_per_sample
    from benchmarks.cases.metrics import MapAgreement, TopOne

    # 24 lines read by one model only, 30 by the other only: p = 2 P(X <= 24), X ~ Bin(54, 1/2)
    assert mcnemar_exact(24, 30) == pytest.approx(0.4966, abs=1e-4)
    assert mcnemar_exact(30, 24) == mcnemar_exact(24, 30)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    right_a = np.array([True, True, False, False, True])
    right_b = np.array([True, False, True, True, True])
    assert compare(right_a, right_b) == {"samples": 5, "right_a": 3, "right_b": 4, "only_a": 1, "only_b": 2,
                                         "p_value": 1.0}
    session = _identity_session(["N", 3])
    scores = np.array([[0, 1, 0], [2, 0, 0], [0, 0, 1]], np.float32)
    np.testing.assert_array_equal(right_per_sample(session, scores, [1, 0, 0], TopOne()), [True, True, False])
    session = _identity_session(["N", 4, 4], "a\nb")
    probs = _one_hot([[1, 0, 2, 3], [2, 2, 1, 0]])
    np.testing.assert_array_equal(right_per_sample(session, probs, ["ab ", "a"], TextLines()), [True, False])
    with pytest.raises(OnnxSparseError, match="scores maps"):
        right_per_sample(session, probs, None, MapAgreement())


def test_augment_agreement_of_a_model_that_ignores_position():
    import torch

    from benchmarks.augment_agreement import agreement, square_crop

    x = np.random.default_rng(0).random((16, 1, 8, 8)).astype(np.float32)
    out = square_crop(torch.from_numpy(x), torch.Generator().manual_seed(0))
    assert out.shape == (16, 1, 8, 8) and not torch.equal(out, torch.from_numpy(x))
    # a model whose top-1 is the row (first half vs second half) holding more ink: a flip keeps it, crops may not
    w = np.zeros((64, 2), np.float32)
    w[:32, 0] = w[32:, 1] = 1
    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
                              [onnx.numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    values = agreement(session, x, seed=0)
    assert values["horizontal flip"] == 1.0
    assert set(values) == {"horizontal flip", "crop, aspect 3/4-4/3 of the input's", "crop, square 3/4-4/3"}
    assert all(0.0 <= v <= 1.0 for v in values.values())
    assert agreement(session, x, seed=0) == values  # seeded


def test_merge_replaces_runs_by_key_and_drops_rows_without_provenance():
    from benchmarks.merge import drop_unrecorded, merge

    base = {"cases": {"a": {"runs": {"m@0.5": {"top1": 0.1}, "u@0.5": {"top1": 0.2, "commit": "x"}}}},
            "invocations": [{"argv": ["old"]}]}
    new = {"cases": {"a": {"runs": {"m@0.5": {"top1": 0.3, "commit": "y"}}}, "b": {"runs": {"m@0.9": {"commit": "y"}}}},
           "invocations": [{"argv": ["new"], "commit": "y"}], "machine": {"cpu": "c"}}
    assert drop_unrecorded(base) == 1 and base["invocations"] == []
    merged = merge(base, new)
    assert merged["cases"]["a"]["runs"] == {"m@0.5": {"top1": 0.3, "commit": "y"}, "u@0.5": {"top1": 0.2, "commit": "x"}}
    assert set(merged["cases"]) == {"a", "b"} and merged["invocations"] == [{"argv": ["new"], "commit": "y"}]
