"""``onnxsparse eval`` and ``onnxsparse compare`` on tiny models with known answers."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from onnxsparse.errors import OnnxSparseError
from onnxsparse.data import PreprocessConfig, load_calibration
from onnxsparse.evaluate import (
    Accuracy,
    compare,
    evaluate,
    image_pipeline,
    iter_batches,
    load_images,
    scan_folder,
)
from onnxsparse_cli.main import main

# Constant gray images: the brightness x in [0, 1] decides the class. Scores of the tiny model:
# s_dark = 1 - 2x, s_mid = 0.2, s_bright = 2x - 1, so argmax is dark / mid / bright for x = 0.1 / 0.5 / 0.9.
LEVELS = {"dark": 25, "mid": 128, "bright": 230}
MODEL_ORDER = ("dark", "mid", "bright")
PER_CLASS = 4


def _brightness_model(w_bright: float = 2.0, batch: int | str = "N") -> onnx.ModelProto:
    weight = np.array([[-2.0, 0.0, w_bright]], np.float32)
    bias = np.array([1.0, 0.2, -1.0], np.float32)
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "W", "B"], ["scores"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes, "brightness",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, 8, 8])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, 3])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture()
def setup(tmp_path):
    data = tmp_path / "data"
    for name, level in LEVELS.items():
        (data / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            Image.fromarray(np.full((10, 12), level, np.uint8), "L").save(data / name / f"{i}.png")
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(MODEL_ORDER) + "\n")
    models = tmp_path / "models"
    models.mkdir()
    dense, sparse = models / "dense.onnx", models / "sparse.onnx"
    onnx.save(_brightness_model(), str(dense))
    onnx.save(_brightness_model(w_bright=0.0), str(sparse))  # bright images now score as "mid"
    return tmp_path, data, labels, dense, sparse


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args] + ["--workers", "0"])


def test_eval_with_labels_file_is_exact(setup):
    _, data, labels, dense, _ = setup
    result = _run("eval", dense, "--data", data, "--labels", labels, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["images"] == 3 * PER_CLASS and out["classes"] == 3
    assert out["top1"] == 1.0 and out["top5"] is None  # 3 classes: top-5 is meaningless
    assert out["preprocess"]["settings"]["channel_order"]["value"] == "gray"


def test_eval_default_class_order_is_sorted_folders(setup):
    # Sorted folders give bright=0, dark=1, mid=2; the model says 0/1/2 for dark/mid/bright: all wrong.
    _, data, _, dense, _ = setup
    result = _run("eval", dense, "--data", data, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["top1"] == 0.0


def test_eval_table_and_wrong_image(setup):
    tmp, data, labels, dense, _ = setup
    # One dark image filed under "mid": 11 of 12 right.
    Image.fromarray(np.full((10, 12), 25, np.uint8), "L").save(data / "mid" / "misfiled.png")
    result = _run("eval", dense, "--data", data, "--labels", labels)
    assert result.exit_code == 0, result.output
    assert "top-1      92.31% (12/13)" in result.output
    assert "top-5      n/a" in result.output


def test_eval_fixed_batch_model_and_workers(setup, tmp_path):
    _, data, labels, _, _ = setup
    fixed = tmp_path / "fixed.onnx"
    onnx.save(_brightness_model(batch=1), str(fixed))
    res = evaluate(fixed, data, labels_file=labels, batch_size=5)
    assert res.top1 == 1.0 and res.images == 3 * PER_CLASS
    # decoding in two worker processes gives the same answer
    runner = CliRunner().invoke(main, ["eval", str(fixed), "--data", str(data), "--labels", str(labels),
                                       "--json", "--workers", "2", "--limit", "6"])
    assert runner.exit_code == 0, runner.output
    out = json.loads(runner.output)
    assert out["images"] == 6 and out["top1"] == 1.0


def test_top5():
    acc = Accuracy()
    scores = np.tile(np.arange(8, dtype=np.float32), (3, 1))  # ranking: 7, 6, 5, 4, 3, 2, 1, 0
    acc.add(scores, np.array([7, 3, 1]))
    d = acc.as_dict()
    assert d["top1"] == pytest.approx(1 / 3) and d["top5"] == pytest.approx(2 / 3)


def test_compare_reports_agreement_and_sparsity(setup):
    _, data, labels, dense, sparse = setup
    res = compare(dense, sparse, data, labels_file=labels)
    assert res.images == 3 * PER_CLASS
    assert res.top1_agreement == pytest.approx(2 / 3)
    assert res.dense_accuracy["top1"] == 1.0 and res.sparse_accuracy["top1"] == pytest.approx(2 / 3)
    (out,) = res.outputs
    assert out["name"] == "scores" and 0 < out["cosine"] < 1 and out["max_abs_diff"] == pytest.approx(2 * 230 / 255, 1e-5)
    (layer,) = res.layers
    assert layer.tensor == "W" and layer.dense_sparsity == pytest.approx(1 / 3)
    assert layer.sparse_sparsity == pytest.approx(2 / 3)
    same = compare(dense, dense, data)
    assert same.top1_agreement == 1.0 and same.outputs[0]["cosine"] == pytest.approx(1.0)
    assert same.outputs[0]["max_abs_diff"] == 0.0


def test_compare_cli_exit_codes(setup):
    _, data, labels, dense, sparse = setup
    ok = _run("compare", dense, sparse, "--data", data, "--min-agreement", "0.6")
    assert ok.exit_code == 0, ok.output
    assert "agreement         66.67% (lowest per output)" in ok.output and "PASSED" in ok.output
    bad = _run("compare", dense, sparse, "--data", data, "--min-agreement", "0.9")
    assert bad.exit_code == 1, bad.output
    assert "FAILED: agreement 66.67% < --min-agreement 90.00%" in bad.output
    assert "Traceback" not in bad.output
    as_json = _run("compare", dense, sparse, "--data", data, "--labels", labels, "--min-agreement", "0.9", "--json")
    assert as_json.exit_code == 1
    payload = json.loads(as_json.output[: as_json.output.rindex("}") + 1])
    assert payload["passed"] is False and payload["sparse_accuracy"]["top1"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--min-agreement", "95"], "--min-agreement must be a fraction in [0, 1]"),
        (["--labels", "missing.txt"], "--labels file missing.txt does not exist"),
        (["--limit", "0"], "--limit must be >= 1"),
    ],
)
def test_compare_user_errors(setup, args, message):
    _, data, _, dense, sparse = setup
    result = _run("compare", dense, sparse, "--data", data, *args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_eval_user_errors(setup, tmp_path):
    _, data, labels, dense, _ = setup
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(flat / "a.png")
    result = _run("eval", dense, "--data", flat)
    assert result.exit_code == 2 and "not a labelled image folder" in result.output
    short = tmp_path / "short.txt"
    short.write_text("dark\nmid\n")
    result = _run("eval", dense, "--data", data, "--labels", short)
    assert result.exit_code == 2 and "'bright'" in result.output and "not in --labels" in result.output
    many = tmp_path / "many.txt"
    many.write_text("a\nb\nc\nd\ndark\nmid\nbright\n")
    result = _run("eval", dense, "--data", data, "--labels", many)
    assert result.exit_code == 2 and "the model outputs 3 scores" in result.output
    result = _run("eval", tmp_path / "nope.onnx", "--data", data)
    assert result.exit_code == 2 and "does not exist" in result.output


def test_scan_folder_head_is_balanced(setup):
    _, data, labels, _, _ = setup
    folder = scan_folder(data, labels_file=labels).head(6)
    assert sorted(folder.labels) == [0, 0, 1, 1, 2, 2]
    with pytest.raises(OnnxSparseError, match="more than once"):
        dup = labels.parent / "dup.txt"
        dup.write_text("a\na\n")
        scan_folder(data, labels_file=dup)


def _identity_model(shape: list) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize(
    ("shape", "image", "options"),
    [
        (["N", 1, 8, 8], np.arange(10 * 12, dtype=np.uint8).reshape(10, 12), {"mean": 0.3, "std": 0.2}),
        (["N", 3, 6, 6], np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8),
         {"preset": "imagenet", "channel_order": "bgr"}),
        (["N", 5, 4, 3], np.random.default_rng(1).integers(0, 256, (9, 5, 3), dtype=np.uint8),
         {"resize": 6, "crop": (5, 4), "mean": (0.4, 0.5, 0.6), "std": (0.2, 0.3, 0.4)}),
    ],
    ids=["gray-nchw", "bgr-preset-nchw", "rgb-resize-crop-nhwc"],
)
def test_eval_compare_and_prune_preprocess_a_file_identically(tmp_path, shape, image, options):
    # Three copies of one file: every calibration sample of prune and every batch row of eval/compare is that file.
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        Image.fromarray(image).save(data / f"{i}.png")
    model = _identity_model(shape)
    preprocess = PreprocessConfig(augment=False, workers=0, **options)
    prune_side = load_calibration(data, model, preprocess=preprocess, selection_size=1, verify_size=1)
    samples = np.concatenate([prune_side.train["x"], prune_side.selection["x"], prune_side.verification["x"]])
    (feed, _), = iter_batches(scan_folder(data, require_labels=False), image_pipeline(model, None, preprocess), 8,
                              workers=0)
    eval_side = load_images(model, data, preprocess=preprocess, require_labels=False)
    assert samples.shape == feed["x"].shape == eval_side.inputs.shape == (3, *[d for d in shape[1:]])
    for tensors in (feed["x"], eval_side.inputs, samples):
        assert tensors.dtype == np.float32
        for row in tensors:
            np.testing.assert_array_equal(row, samples[0])
    assert len(np.unique(samples[0])) > 1  # a constant tensor would prove nothing


def test_compare_takes_the_tensors_prune_takes(setup, tmp_path):
    _, _, labels, dense, sparse = setup
    levels = np.array([25, 128, 230, 128, 25, 230], np.float32) / 255.0
    x = np.broadcast_to(levels[:, None, None, None], (6, 1, 8, 8)).astype(np.float32)
    folder = tmp_path / "calib"
    folder.mkdir()
    np.save(folder / "a.npy", x[:4])
    np.savez(folder / "b.npz", x=x[4:])
    one_file = tmp_path / "one.npy"
    np.save(one_file, x)
    for source in (folder, one_file):
        res = compare(dense, sparse, source)
        # The sparse model scores bright inputs as "mid": 2 of the 6 disagree.
        assert res.images == 6 and res.top1_agreement == pytest.approx(4 / 6)
        assert res.dense_accuracy is None and res.sparse_accuracy is None
        cli = _run("compare", dense, sparse, "--data", source, "--min-agreement", "0.6")
        assert cli.exit_code == 0 and "6 images from" in cli.output and "66.67%" in cli.output, cli.output
    assert compare(dense, sparse, folder, limit=4).images == 4
    with pytest.raises(OnnxSparseError, match="--labels needs a labelled image folder"):
        compare(dense, sparse, folder, labels_file=labels)
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(folder / "stray.png")
    with pytest.raises(OnnxSparseError, match=r"holds both image files \(1\) and .npy/.npz files \(2"):
        compare(dense, sparse, folder)


# ---------------------------------------------------------------------------------------------------------
# prune --report: the PNG next to the JSON


def _report(info: dict) -> dict:
    layers = [{"name": f"w{i}", "node": f"conv{i}", "op": "Conv", "params": 100, "target_sparsity": s,
               "achieved_sparsity": s} for i, s in enumerate((0.5, 0.9, 0.7))]
    return {"method": "unipts", "target_sparsity": 0.7, "achieved_sparsity": 0.7, "prunable_params": 300,
            "layers": layers, "method_info": info}


def test_find_curve_prefers_the_per_epoch_curve():
    from onnxsparse.report_plot import find_curve

    curve = [{"epoch": e, "step": 10 * e, "loss": 1.0 / (e + 1), "selection_top1_agreement": 0.9} for e in range(3)]
    info = {"allocation": {"history": [{"generation": 0, "best": -1.0}]}, "training": {"curve": curve}}
    where, x, rows = find_curve(info)
    assert (where, x, rows) == ("training.curve", "epoch", curve)
    assert find_curve(info, ("generation",))[0] == "allocation.history"
    assert find_curve({"correction": {"uncorrected": []}}) is None and find_curve(None) is None


def test_report_png_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    from onnxsparse.report_plot import plot_path, write_report_plot

    info = {"training": {"curve": [{"epoch": e, "loss": 2.0 - e, "selection_top1_agreement": 0.5 + e / 10}
                                   for e in range(4)]}}
    out = write_report_plot(_report(info), plot_path(tmp_path / "r.json"))
    assert out == tmp_path / "r.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert write_report_plot(_report({}), tmp_path / "bars.png").stat().st_size > 1000  # no curve: bars only


def test_report_png_skipped_without_matplotlib(tmp_path, monkeypatch, caplog):
    import sys

    from onnxsparse.report_plot import write_report_plot

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    with caplog.at_level("INFO", logger="onnxsparse.report_plot"):
        assert write_report_plot(_report({}), tmp_path / "r.png") is None
    assert not (tmp_path / "r.png").exists()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "matplotlib is not installed" in lines[0]


def test_prune_report_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    import graphs

    model = tmp_path / "tiny.onnx"
    onnx.save(graphs.export_torch(graphs.tiny_cnn()), str(model))
    calib = tmp_path / "calib"
    calib.mkdir()
    np.save(calib / "x.npy", np.random.default_rng(0).standard_normal((48, 1, 12, 12)).astype(np.float32))
    result = CliRunner().invoke(main, ["prune", str(model), "--sparsity", "0.5", "--calib", str(calib), "-o",
                                       str(tmp_path / "s.onnx"), "--method", "magnitude", "--report",
                                       str(tmp_path / "report.json"), "-q"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report.json").is_file() and (tmp_path / "report.png").is_file()
