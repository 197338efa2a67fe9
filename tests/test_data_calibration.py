"""Calibration sets: source checks, seeded splits, batches, feeds and batch-size checks."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image

from onnxsparse.data import (
    CalibrationSet,
    PreprocessConfig,
    check_batch_size,
    default_held_out_size,
    load_calibration,
)
from onnxsparse.errors import OnnxSparseError


def make_model(shape, dtype=TensorProto.FLOAT, name="x") -> onnx.ModelProto:
    x = helper.make_tensor_value_info(name, dtype, shape)
    y = helper.make_tensor_value_info("y", dtype, shape)
    graph = helper.make_graph([helper.make_node("Identity", [name], ["y"])], "g", [x], [y])
    return helper.make_model(graph)


IMAGE = make_model(["N", 3, 4, 4])


def samples(n, shape=(3, 4, 4)):
    return (np.arange(n, dtype=np.float32).reshape(-1, *([1] * len(shape))) + np.zeros(shape, np.float32))


def ids(array):
    return [int(v) for v in np.asarray(array).reshape(len(array), -1)[:, 0]]


# --- sources that do not exist or hold nothing --------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(OnnxSparseError, match=r"calibration source .*nope does not exist"):
        load_calibration(tmp_path / "nope", IMAGE)


def test_empty_folder(tmp_path):
    with pytest.raises(OnnxSparseError, match=r"calibration folder .* is empty"):
        load_calibration(tmp_path, IMAGE)


def test_folder_without_images(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "labels.csv").write_text("x")
    with pytest.raises(OnnxSparseError, match=r"has no image files \(.jpg, .jpeg, .png.*found 2 other file\(s\), e.g."):
        load_calibration(tmp_path, IMAGE)


def test_single_image_or_unknown_file(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "one.png")
    with pytest.raises(OnnxSparseError, match="is a single image; --calib needs a folder of images"):
        load_calibration(tmp_path / "one.png", IMAGE)
    (tmp_path / "data.csv").write_text("1,2")
    with pytest.raises(OnnxSparseError, match=r"is not a folder, .npy or .npz file \(got .csv\)"):
        load_calibration(tmp_path / "data.csv", IMAGE)


def test_image_folder_with_multi_input_model(tmp_path):
    for i in range(2):
        Image.new("RGB", (4, 4)).save(tmp_path / f"{i}.png")
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3, 4, 4])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 3, 4, 4])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4, 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "g", [a, b], [out]))
    with pytest.raises(OnnxSparseError, match="an image folder feeds one image input, but the model has 2 inputs"):
        load_calibration(tmp_path, model)


def test_non_float_input_with_image_folder(tmp_path):
    for i in range(2):
        Image.new("RGB", (4, 4)).save(tmp_path / f"{i}.png")
    with pytest.raises(OnnxSparseError, match="input 'x' is a uint8 tensor"):
        load_calibration(tmp_path, make_model(["N", 3, 4, 4], TensorProto.UINT8))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_samples": 0}, "--max-samples must be an integer >= 1"),
        ({"selection_size": -1}, "--selection-size must be an integer >= 0"),
        ({"seed": 1.5}, "--seed must be an integer"),
        ({"preprocess": {"preset": "imagenet"}}, "preprocess must be a PreprocessConfig"),
    ],
)
def test_argument_validation(kwargs, match):
    with pytest.raises(OnnxSparseError, match=match):
        load_calibration(samples(4), IMAGE, **kwargs)


# --- splits -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, expected", [(2, 0), (10, 3), (64, 21), (100, 32), (320, 32), (500, 50), (9999, 1000), (100_000, 1000)]
)
def test_default_held_out_size(n, expected):
    assert default_held_out_size(n) == expected


def test_fewer_than_two_samples():
    with pytest.raises(OnnxSparseError, match=r"has 1 usable sample\(s\); calibration needs at least 2"):
        load_calibration(samples(1), IMAGE)


def test_selection_leaving_no_training_data():
    with pytest.raises(OnnxSparseError, match="--selection-size 5 and --verify-size 1 leave no training samples: .* "
                                              "has 5 sample"):
        load_calibration(samples(5), IMAGE, selection_size=5)
    with pytest.raises(OnnxSparseError, match=r"--selection-size 3 and --verify-size 2 leave .* has 9 sample\(s\), "
                                              r"5 used \(max_samples\); their sum must be below 5"):
        load_calibration(samples(9), IMAGE, selection_size=3, verify_size=2, max_samples=5)
    with pytest.raises(OnnxSparseError, match="--max-samples 1 is too small"):
        load_calibration(samples(9), IMAGE, max_samples=1)


def test_max_samples_caps_train_plus_selection():
    cs = load_calibration(samples(1000), IMAGE, max_samples=100)
    assert (cs.n_train, cs.n_selection, cs.n_verification) == (36, 32, 32)
    assert cs.pipeline["split"]["max_samples"] == 100


def test_split_without_replacement_and_sizes():
    cs = load_calibration(samples(200), IMAGE, seed=1, verify_size=40)
    assert (cs.n_train, cs.n_selection, cs.n_verification) == (128, 32, 40)
    train, selection, verification = ids(cs.train["x"]), ids(cs.selection["x"]), ids(cs.verification["x"])
    assert (len(set(train)), len(set(selection)), len(set(verification))) == (128, 32, 40)
    assert not set(train) & set(selection) and not set(train) & set(verification)
    assert not set(selection) & set(verification)
    assert cs.pipeline["split"] == {
        "seed": 1, "available": 200, "train": 128, "selection": 32, "verification": 40, "max_samples": None,
        "selection_size": {"value": 32, "source": "default"}, "verify_size": {"value": 40, "source": "user"},
    }


def test_method_view_has_no_verification_samples():
    cs = load_calibration(samples(200), IMAGE, seed=1)
    view = cs.without_verification()
    assert cs.n_verification == 32 and view.n_verification == 0
    assert view.verification["x"].shape == (0, 3, 4, 4)
    np.testing.assert_array_equal(view.selection["x"], cs.selection["x"])
    np.testing.assert_array_equal(view.train["x"], cs.train["x"])


def test_selection_is_stable_when_max_samples_changes():
    small = load_calibration(samples(100), IMAGE, max_samples=30, selection_size=20, verify_size=5, seed=4)
    large = load_calibration(samples(100), IMAGE, max_samples=70, selection_size=20, verify_size=5, seed=4)
    assert (small.n_train, large.n_train) == (5, 45)
    assert ids(small.selection["x"]) == ids(large.selection["x"])
    assert ids(small.verification["x"]) == ids(large.verification["x"])
    assert set(ids(small.train["x"])) <= set(ids(large.train["x"]))


def test_selection_zero():
    cs = load_calibration(samples(4), IMAGE, selection_size=0)
    assert cs.n_selection == 0 and cs.selection["x"].shape == (0, 3, 4, 4)
    assert list(cs.batches("selection", 2, shuffle=False, seed=0)) == []
    assert list(cs.feeds("selection", 2)) == []


def test_image_split_is_seeded(tmp_path):
    for i in range(12):
        Image.fromarray(np.full((4, 4, 3), i * 20, np.uint8)).save(tmp_path / f"{i:02d}.png")
    config = PreprocessConfig(workers=0, scale=1.0)
    a = load_calibration(tmp_path, IMAGE, preprocess=config, selection_size=4, seed=2)
    b = load_calibration(tmp_path, IMAGE, preprocess=config, selection_size=4, seed=2)
    c = load_calibration(tmp_path, IMAGE, preprocess=config, selection_size=4, seed=3)
    np.testing.assert_array_equal(a.selection["x"], b.selection["x"])
    assert sorted(ids(a.selection["x"])) != sorted(ids(c.selection["x"]))
    assert (a.n_train, a.n_selection, a.n_verification) == (4, 4, 4)
    everything = sorted(ids(a.selection["x"]) + ids(a.train["x"]) + ids(a.verification["x"]))
    assert everything == [i * 20 for i in range(12)]


# --- batches and feeds --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calib() -> CalibrationSet:
    return load_calibration(samples(20), IMAGE, selection_size=5, verify_size=0, seed=0)


def test_batches_in_order_and_drop_last(calib):
    batches = list(calib.batches("train", 4, shuffle=False, seed=0))
    assert [b[0].shape[0] for b in batches] == [4, 4, 4, 3]
    assert torch.cat([b[0] for b in batches]).numpy().tolist() == calib.train["x"].tolist()
    assert [b[0].shape[0] for b in calib.batches("train", 4, shuffle=False, seed=0, drop_last=True)] == [4, 4, 4]
    assert all(isinstance(b, tuple) and b[0].dtype == torch.float32 for b in batches)


def test_shuffle_is_seeded(calib):
    def order(seed):
        return [ids(b[0]) for b in calib.batches("train", 5, shuffle=True, seed=seed)]

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(sum(order(1), [])) == sorted(ids(calib.train["x"]))


def test_rank_sharding_covers_everything_evenly(calib):
    shards = [
        sum((ids(b[0]) for b in calib.batches("train", 2, shuffle=True, seed=3, rank=r, world_size=4)), [])
        for r in range(4)
    ]
    assert all(len(s) == 4 for s in shards)  # 15 samples padded to 16
    assert set(sum(shards, [])) == set(ids(calib.train["x"]))
    with pytest.raises(OnnxSparseError, match="rank must be in 0..world_size-1"):
        list(calib.batches("train", 2, shuffle=False, seed=0, rank=4, world_size=4))


def test_batches_validate_arguments(calib):
    with pytest.raises(OnnxSparseError, match="split must be one of train, selection, verification, got 'test'"):
        list(calib.batches("test", 2, shuffle=False, seed=0))
    with pytest.raises(OnnxSparseError, match="batch_size must be an integer >= 1"):
        list(calib.batches("train", 0, shuffle=False, seed=0))


def test_augmentation_only_for_training_split(tmp_path):
    for i in range(6):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (4, 4, 3), np.uint8)).save(tmp_path / f"{i}.png")
    cs = load_calibration(tmp_path, IMAGE, preprocess=PreprocessConfig(workers=0), selection_size=2)
    assert cs.augment
    plain = torch.cat([b[0] for b in cs.batches("train", 8, shuffle=False, seed=0)])
    augmented = torch.cat([b[0] for b in cs.batches("train", 8, shuffle=False, seed=0, augment=True)])
    again = torch.cat([b[0] for b in cs.batches("train", 8, shuffle=False, seed=0, augment=True)])
    assert not torch.equal(plain, augmented)
    assert torch.equal(augmented, again)
    selection = torch.cat([b[0] for b in cs.batches("selection", 8, shuffle=False, seed=0, augment=True)])
    np.testing.assert_array_equal(selection.numpy(), cs.selection["x"])
    off = load_calibration(tmp_path, IMAGE, preprocess=PreprocessConfig(workers=0, augment=False), selection_size=2)
    assert torch.equal(torch.cat([b[0] for b in off.batches("train", 8, shuffle=False, seed=0, augment=True)]), plain)


def test_feeds_cast_to_declared_dtype():
    model = make_model(["N", 3, 4, 4], TensorProto.FLOAT16)
    cs = load_calibration(samples(7), model, selection_size=2, verify_size=0)
    feeds = list(cs.feeds("train", 2))
    assert [f["x"].shape[0] for f in feeds] == [2, 2, 1]
    assert all(f["x"].dtype == np.float16 for f in feeds)
    assert cs.train["x"].dtype == np.float32


def test_feeds_run_in_onnxruntime(calib):
    import onnxruntime as ort

    session = ort.InferenceSession(IMAGE.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = [session.run(None, feed)[0] for feed in calib.feeds("selection", 2)]
    np.testing.assert_array_equal(np.concatenate(outputs), calib.selection["x"])


def test_check_batch_size(calib):
    check_batch_size(10, 10)
    with pytest.raises(OnnxSparseError, match="train split has 3 sample.*fewer than the batch size 4"):
        check_batch_size(3, 4)
    with pytest.raises(OnnxSparseError, match="--batch-size must be an integer >= 1"):
        check_batch_size(3, 0)
    calib.check_batch_size(15)
    with pytest.raises(OnnxSparseError, match="selection split has 5 sample"):
        calib.check_batch_size(8, split="selection")


def test_pipeline_is_json(calib):
    json.dumps(calib.pipeline)
    assert calib.pipeline["preprocess"] is None


def test_calibration_set_validates():
    arrays = {"x": np.zeros((2, 3), np.float32)}
    with pytest.raises(OnnxSparseError, match="selection has arrays for"):
        CalibrationSet(arrays, {}, ("x",), False, {}, {})
    with pytest.raises(OnnxSparseError, match="float32"):
        CalibrationSet({"x": np.zeros((2, 3))}, {"x": np.zeros((0, 3))}, ("x",), False, {}, {})
    with pytest.raises(OnnxSparseError, match="augmentation needs exactly one image input"):
        CalibrationSet(arrays, {"x": np.zeros((0, 3), np.float32)}, ("x",), True, {}, {})
    with pytest.raises(OnnxSparseError, match="JSON"):
        CalibrationSet(arrays, {"x": np.zeros((0, 3), np.float32)}, ("x",), False, {"a": object()}, {})


@pytest.mark.cuda
def test_batches_on_cuda_with_augmentation(tmp_path):
    for i in range(6):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (4, 4, 3), np.uint8)).save(tmp_path / f"{i}.png")
    cs = load_calibration(tmp_path, IMAGE, preprocess=PreprocessConfig(workers=0), selection_size=2)
    cpu = [b[0] for b in cs.batches("train", 3, shuffle=True, seed=1, augment=True)]
    gpu = [b[0] for b in cs.batches("train", 3, shuffle=True, seed=1, augment=True, device="cuda")]
    assert all(t.is_cuda for t in gpu)
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu(), a, atol=1e-5, rtol=0)
