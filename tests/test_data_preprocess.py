"""Input specs, preprocessing options, presets, and their resolution with provenance."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxsparse.data import (
    InputSpec,
    PreprocessConfig,
    input_specs,
    parse_floats,
    parse_scale,
    parse_size,
    resolve_preprocess,
)
from onnxsparse.data.preprocess_resolution import METADATA_KEY, SIDECAR_NAME
from onnxsparse.errors import OnnxSparseError


def make_model(shape, dtype=TensorProto.FLOAT, name="x", metadata=None) -> onnx.ModelProto:
    x = helper.make_tensor_value_info(name, dtype, shape)
    y = helper.make_tensor_value_info("y", dtype, shape)
    graph = helper.make_graph([helper.make_node("Identity", [name], ["y"])], "g", [x], [y])
    model = helper.make_model(graph)
    if metadata is not None:
        helper.set_model_props(model, {METADATA_KEY: json.dumps(metadata)})
    return model


def resolve(shape, model_path=None, metadata=None, **options):
    model = make_model(shape, metadata=metadata)
    return resolve_preprocess(PreprocessConfig(**options), input_specs(model)[0], model=model, model_path=model_path)


def settings(resolved):
    return {k: (s.value, s.source) for k, s in resolved.settings().items()}


# --- input_specs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, layout",
    [
        (["N", 3, 224, 224], "nchw"),
        ([1, 224, 224, 3], "nhwc"),
        (["N", 1, 28, 28], "nchw"),
        (["N", "H", "W", 3], "nhwc"),
        (["N", "C", "H", "W"], "nchw"),
        ([1, 3, 3, 3], "nchw"),
        (["N", 10], "other"),
        ([2, 3, 32], "other"),
    ],
)
def test_input_specs_layout(shape, layout):
    spec = input_specs(make_model(shape))[0]
    assert spec.layout == layout
    assert spec.shape == tuple(d if isinstance(d, int) else None for d in shape)
    assert spec.dtype == np.float32


def test_input_specs_skips_initializers_and_keeps_order():
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT16, ["N", 4])
    b = helper.make_tensor_value_info("b", TensorProto.DOUBLE, ["N", 4])
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [4])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    init = helper.make_tensor("w", TensorProto.FLOAT, [4], [1, 2, 3, 4])
    graph = helper.make_graph([helper.make_node("Identity", ["a"], ["y"])], "g", [b, w, a], [out], [init])
    specs = input_specs(helper.make_model(graph))
    assert [s.name for s in specs] == ["b", "a"]
    assert [s.dtype for s in specs] == [np.dtype(np.float64), np.dtype(np.float16)]


def test_input_specs_no_shape_and_int_dtype():
    x = helper.make_tensor_value_info("ids", TensorProto.INT64, None)
    y = helper.make_tensor_value_info("y", TensorProto.INT64, None)
    graph = helper.make_graph([helper.make_node("Identity", ["ids"], ["y"])], "g", [x], [y])
    spec = input_specs(helper.make_model(graph))[0]
    assert spec.has_shape is False and spec.rank is None and spec.layout == "other"
    assert spec.dtype == np.int64 and not spec.is_float


def test_input_spec_validates():
    with pytest.raises(OnnxSparseError, match="layout"):
        InputSpec("x", "chw", (1, 3, 4, 4), np.float32)
    with pytest.raises(OnnxSparseError, match="rank 4"):
        InputSpec("x", "nchw", (1, 3), np.float32)


# --- option parsing and validation --------------------------------------------------------------


def test_parse_helpers():
    assert parse_size("224x192") == (224, 192)
    assert parse_size("28") == (28, 28)
    assert parse_size(32) == (32, 32)
    assert parse_size([10, 20]) == (10, 20)
    assert parse_floats("0.485, 0.456,0.406", "--mean") == (0.485, 0.456, 0.406)
    assert parse_floats(0.5, "--mean") == (0.5,)
    assert parse_scale("1/255") == pytest.approx(1 / 255)
    assert parse_scale(2) == 2.0
    for bad in ("224x", "axb", (0, 3), (1, 2, 3), True):
        with pytest.raises(OnnxSparseError, match="--input-size"):
            parse_size(bad)
    with pytest.raises(OnnxSparseError, match="--mean"):
        parse_floats("a,b", "--mean")
    with pytest.raises(OnnxSparseError, match="--scale"):
        parse_scale("1/0")


@pytest.mark.parametrize(
    "options, match",
    [
        ({"preset": "resnet"}, "--preset must be one of imagenet, caffe, tf, none, got 'resnet'"),
        ({"resize": 0}, "--resize must be an integer >= 1, got 0"),
        ({"resize": 2.5}, "--resize"),
        ({"crop": (224, 0)}, "--crop"),
        ({"input_size": (224,)}, "--input-size"),
        ({"std": (0.2, 0.0, 0.2)}, r"--std values must be > 0"),
        ({"mean": (float("nan"),)}, "--mean must be finite"),
        ({"scale": 0}, "--scale must be a positive"),
        ({"scale": float("inf")}, "--scale"),
        ({"channel_order": "rgba"}, "--channel-order must be one of rgb, bgr, gray"),
        ({"layout": "chw"}, "--layout must be one of nchw, nhwc"),
        ({"workers": -1}, "--workers must be an integer >= 0"),
        ({"augment": "yes"}, "augment"),
        ({"max_pixels": 0}, "max_pixels"),
    ],
)
def test_config_rejects_bad_values(options, match):
    with pytest.raises(OnnxSparseError, match=match):
        PreprocessConfig(**options)


def test_config_normalises_values():
    config = PreprocessConfig(preset="ImageNet", crop=[200, 100], mean=[1, 2, 3], scale="1/255", layout="NHWC")
    assert config.preset == "imagenet"
    assert config.crop == (200, 100)
    assert config.mean == (1.0, 2.0, 3.0)
    assert config.scale == pytest.approx(1 / 255)
    assert config.layout == "nhwc"
    hash(config)  # frozen and hashable


# --- resolution ---------------------------------------------------------------------------------


def test_imagenet_preset_on_static_model():
    r = resolve(["N", 3, 224, 224], preset="imagenet")
    s = settings(r)
    assert s["resize"] == (256, "preset")
    assert s["crop"] == ((224, 224), "preset")
    assert s["input_size"] == ((224, 224), "model input shape")
    assert s["layout"] == ("nchw", "model input shape")
    assert s["channels"] == (3, "model input shape")
    assert s["mean"] == ((0.485, 0.456, 0.406), "preset")
    assert s["std"] == ((0.229, 0.224, 0.225), "preset")
    assert s["scale"][1] == "preset"
    assert s["channel_order"] == ("rgb", "preset")
    report = json.loads(json.dumps(r.as_dict()))
    assert report["settings"]["input_size"] == {"value": [224, 224], "source": "model input shape"}
    assert report["preset"] == "imagenet"
    assert report["steps"][1] == "resize shorter side to 256 (bilinear)"


def test_defaults_without_preset():
    s = settings(resolve(["N", 1, 28, 28]))
    assert s["scale"] == (pytest.approx(1 / 255), "default")
    assert s["mean"] == ((0.0,), "default")
    assert s["std"] == ((1.0,), "default")
    assert s["channel_order"] == ("gray", "model input shape")
    assert s["resize"] == (None, "default")
    assert s["crop"] == (None, "default")


def test_precedence_user_sidecar_metadata_preset(tmp_path):
    model_path = tmp_path / "model.onnx"
    (tmp_path / SIDECAR_NAME).write_text(json.dumps({"mean": [0.1, 0.2, 0.3], "resize": 300, "scale": 0.5}))
    metadata = {"mean": [0.4, 0.5, 0.6], "std": [2, 2, 2], "resize": 400, "channel_order": "bgr", "scale": 0.25}
    r = resolve(["N", 3, 224, 224], model_path=model_path, metadata=metadata, preset="imagenet", scale=1.0)
    s = settings(r)
    assert s["scale"] == (1.0, "user")
    assert s["mean"] == ((0.1, 0.2, 0.3), "sidecar")
    assert s["resize"] == (300, "sidecar")
    assert s["std"] == ((2.0, 2.0, 2.0), "model metadata")
    assert s["channel_order"] == ("bgr", "model metadata")
    assert s["crop"] == ((224, 224), "preset")
    assert r.as_dict()["sidecar"] == str(tmp_path / SIDECAR_NAME)


def test_sidecar_and_metadata_are_validated(tmp_path):
    model_path = tmp_path / "m.onnx"
    (tmp_path / SIDECAR_NAME).write_text("{not json")
    with pytest.raises(OnnxSparseError, match="preprocess.json is not valid JSON"):
        resolve(["N", 3, 8, 8], model_path=model_path)
    (tmp_path / SIDECAR_NAME).write_text(json.dumps({"mean": [0.5], "colour": "rgb"}))
    with pytest.raises(OnnxSparseError, match="unknown key.*'colour'.*allowed: scale, mean"):
        resolve(["N", 3, 8, 8], model_path=model_path)
    (tmp_path / SIDECAR_NAME).write_text(json.dumps({"std": [0.5, -1, 0.5]}))
    with pytest.raises(OnnxSparseError, match="std in .*preprocess.json values must be > 0"):
        resolve(["N", 3, 8, 8], model_path=model_path)
    with pytest.raises(OnnxSparseError, match="layout in model metadata 'onnxsparse.preprocess' must be one of"):
        resolve(["N", 3, 8, 8], metadata={"layout": "hwc"})


def test_sidecar_ignored_without_model_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / SIDECAR_NAME).write_text(json.dumps({"mean": [0.5]}))
    assert settings(resolve(["N", 3, 8, 8]))["mean"][1] == "default"


def test_dynamic_size_needs_input_size():
    with pytest.raises(OnnxSparseError, match=r"dynamic height or width .*pass --input-size HxW"):
        resolve(["N", 3, "H", "W"], preset="imagenet")
    s = settings(resolve(["N", 3, "H", "W"], preset="imagenet", input_size=(160, 160)))
    assert s["input_size"] == ((160, 160), "user")
    # The preset keeps its resize/crop ratio at the requested size.
    assert s["crop"] == ((160, 160), "preset")
    assert s["resize"] == (round(256 * 160 / 224), "preset")


def test_explicit_crop_defines_size_of_dynamic_input():
    s = settings(resolve(["N", 3, "H", "W"], crop=96, resize=110))
    assert s["input_size"] == ((96, 96), "user")


def test_partially_dynamic_input():
    with pytest.raises(OnnxSparseError, match="dynamic height or width"):
        resolve(["N", 3, 32, "W"])
    with pytest.raises(OnnxSparseError, match="contradicts|is 30x40 but"):
        resolve(["N", 3, 32, "W"], input_size=(30, 40))
    assert settings(resolve(["N", 3, 32, "W"], input_size=(32, 48)))["input_size"] == ((32, 48), "user")


def test_input_size_contradicting_static_model():
    with pytest.raises(OnnxSparseError, match=r"--input-size is 32x32 but input 'x' has shape \[\?, 1, 28, 28\]"):
        resolve(["N", 1, 28, 28], input_size=(32, 32))
    with pytest.raises(OnnxSparseError, match="input_size in model metadata"):
        resolve(["N", 1, 28, 28], metadata={"input_size": [30, 30]})
    assert settings(resolve(["N", 1, 28, 28], input_size="28x28"))["input_size"] == ((28, 28), "user")


def test_user_crop_must_match_input_size():
    with pytest.raises(OnnxSparseError, match="--crop is 200x200 but the input size is 224x224"):
        resolve(["N", 3, 224, 224], crop=200)


def test_preset_crop_scaled_to_static_model():
    r = resolve(["N", 3, 299, 299], preset="imagenet")
    s = settings(r)
    assert s["crop"] == ((299, 299), "preset")
    assert s["resize"] == (round(256 * 299 / 224), "preset")
    assert r.notes and "scaled" in r.notes[0]


@pytest.mark.parametrize("values, match", [((0.5, 0.5), "got 2"), ((1, 2, 3, 4), "got 4")])
def test_mean_with_wrong_number_of_values(values, match):
    with pytest.raises(OnnxSparseError, match=r"--mean must have 3 values \(one per channel\) or 1 for all, " + match):
        resolve(["N", 3, 8, 8], mean=values)
    with pytest.raises(OnnxSparseError, match=r"--std must have 1 value"):
        resolve(["N", 1, 8, 8], std=values)


def test_single_mean_broadcasts():
    s = settings(resolve(["N", 3, 8, 8], mean=0.5, std=(0.25,)))
    assert s["mean"] == ((0.5, 0.5, 0.5), "user")
    assert s["std"] == ((0.25, 0.25, 0.25), "user")


def test_preset_mean_on_gray_model_is_an_error():
    with pytest.raises(OnnxSparseError, match="preset imagenet has 3 mean values but input 'x' has 1 channel"):
        resolve(["N", 1, 224, 224], preset="imagenet")
    s = settings(resolve(["N", 1, 224, 224], preset="imagenet", mean=0.5, std=0.5))
    assert s["channel_order"] == ("gray", "model input shape")


def test_channel_order_checks():
    with pytest.raises(OnnxSparseError, match="--channel-order is rgb but input 'x' has 1 channel"):
        resolve(["N", 1, 8, 8], channel_order="rgb")
    with pytest.raises(OnnxSparseError, match="--channel-order is gray but input 'x' has 3 channels"):
        resolve(["N", 3, 8, 8], channel_order="gray")
    # Dynamic channel count: the channel order decides.
    s = settings(resolve(["N", "C", 8, 8], channel_order="gray"))
    assert s["channels"] == (1, "user")
    assert settings(resolve(["N", "C", 8, 8]))["channels"] == (3, "default")


def test_preset_mean_follows_bgr_order():
    s = settings(resolve(["N", 3, 224, 224], preset="imagenet", channel_order="bgr"))
    assert s["mean"] == ((0.406, 0.456, 0.485), "preset")
    assert s["std"] == ((0.225, 0.224, 0.229), "preset")
    # User values are taken in the model's channel order as given.
    s = settings(resolve(["N", 3, 8, 8], channel_order="bgr", mean=(1, 2, 3)))
    assert s["mean"] == ((1.0, 2.0, 3.0), "user")


def test_caffe_and_tf_presets():
    s = settings(resolve(["N", 3, 32, 32], preset="caffe"))
    assert s["mean"] == ((103.939, 116.779, 123.68), "preset")
    assert s["scale"] == (1.0, "preset") and s["channel_order"] == ("bgr", "preset")
    assert s["resize"] == (None, "default")
    s = settings(resolve(["N", 1, 28, 28], preset="tf"))
    assert s["mean"] == ((0.5,), "preset") and s["std"] == ((0.5,), "preset")


def test_layout_override_and_channel_errors():
    s = settings(resolve(["N", 8, 8, 3]))
    assert s["layout"] == ("nhwc", "model input shape")
    assert settings(resolve(["N", "C", "H", "W"], input_size=(8, 8)))["layout"] == ("nchw", "default")
    with pytest.raises(OnnxSparseError, match=r"has 8 channels .*layout NHWC from user"):
        resolve(["N", 3, 8, 8], layout="nhwc")
    with pytest.raises(OnnxSparseError, match="has 4 channels"):
        resolve(["N", 4, 8, 8])


def test_non_image_input_cannot_take_images():
    with pytest.raises(OnnxSparseError, match=r"not a 4-D image input"):
        resolve(["N", 10])


def test_resize_smaller_than_crop_warns(caplog):
    # at_level: a CLI test run earlier may have left the root logger at ERROR (``-q``).
    with caplog.at_level("WARNING", logger="onnxsparse.data.preprocess_resolution"):
        resolve(["N", 3, 64, 64], resize=32)
    assert "padded with zeros" in caplog.text


def test_resolution_is_logged(caplog):
    caplog.set_level("INFO", logger="onnxsparse.data.preprocess_resolution")
    resolve(["N", 3, 224, 224], preset="imagenet")
    assert "resize=256 (preset)" in caplog.text
    assert "input_size=224x224 (model input shape)" in caplog.text
