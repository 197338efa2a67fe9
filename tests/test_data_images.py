"""Image folders: formats, pixel modes, preprocessing equivalence with torchvision, and bad files."""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image

from onnxsparse.data import PreprocessConfig
from onnxsparse.data import load_calibration as _load_calibration
from onnxsparse.errors import OnnxSparseError


def load_calibration(*args, **kwargs):
    """These tests are about decoding images: no verification split unless a test asks for one (the three-way
    split has its own tests in test_data_calibration.py)."""
    kwargs.setdefault("verify_size", 0)
    return _load_calibration(*args, **kwargs)


def make_model(shape, dtype=TensorProto.FLOAT) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", dtype, shape)
    y = helper.make_tensor_value_info("y", dtype, shape)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    return helper.make_model(graph)


def random_rgb(rng, height, width) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def write_images(folder: Path, count: int, size=(12, 10), seed=0, ext="png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"img{i:03d}.{ext}"
        random_rgb(rng, size[1], size[0]).save(path)
        paths.append(path)
    return paths


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares width x height pixels but holds almost no data (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def load_all(folder, shape, **options):
    """Everything in one array (selection + train), in the order of the sorted file names."""
    workers = options.pop("workers", 0)
    cs = load_calibration(
        folder, make_model(shape), preprocess=PreprocessConfig(workers=workers, **options), selection_size=1
    )
    return cs


# --- formats and modes --------------------------------------------------------------------------


@pytest.mark.parametrize("ext", ["jpg", "jpeg", "png", "bmp", "tif", "tiff", "webp", "JPG"])
def test_formats(tmp_path, ext):
    write_images(tmp_path, 3, ext=ext)
    cs = load_all(tmp_path, ["N", 3, 10, 12])
    assert cs.n_train + cs.n_selection == 3
    assert cs.train["x"].shape == (2, 3, 10, 12)
    assert sum(cs.skipped.values()) == 0


def _single_pixel_value(tmp_path, image: Image.Image, shape, name="a.png", **options) -> np.ndarray:
    folder = tmp_path / "imgs"
    folder.mkdir(exist_ok=True)
    image.save(folder / name)
    image.save(folder / ("b" + name[1:]))
    cs = load_all(folder, shape, **options)
    return cs.train["x"][0]


@pytest.mark.parametrize(
    "mode, color, expected_rgb",
    [
        ("L", 200, (200, 200, 200)),
        ("RGB", (10, 20, 30), (10, 20, 30)),
        ("RGBA", (10, 20, 30, 0), (10, 20, 30)),
        ("LA", (77, 128), (77, 77, 77)),
        ("1", 1, (255, 255, 255)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
    ],
)
def test_modes_to_rgb(tmp_path, mode, color, expected_rgb):
    ext = {"CMYK": "jpg", "LA": "png"}.get(mode, "png")
    image = Image.new(mode, (4, 4), color)
    value = _single_pixel_value(tmp_path, image, ["N", 3, 4, 4], name=f"a.{ext}", scale=1.0)
    np.testing.assert_allclose(value[:, 0, 0], expected_rgb, atol=2 if ext == "jpg" else 0)


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 250, 100, 5] + [0] * 762)
    image.info["transparency"] = 0
    value = _single_pixel_value(tmp_path, image, ["N", 3, 4, 4], scale=1.0)
    np.testing.assert_array_equal(value[:, 0, 0], (250, 100, 5))


def test_rgb_to_gray_model(tmp_path):
    image = Image.new("RGB", (4, 4), (255, 0, 0))
    value = _single_pixel_value(tmp_path, image, ["N", 1, 4, 4], scale=1.0)
    assert value.shape == (1, 4, 4)
    assert value[0, 0, 0] == Image.new("RGB", (1, 1), (255, 0, 0)).convert("L").getpixel((0, 0))  # 76


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_sixteen_bit_gray(tmp_path, ext):
    values = np.array([[0, 257, 65535, 32768]] * 4, dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    gray = _single_pixel_value(tmp_path, image, ["N", 1, 4, 4], name=f"a.{ext}")
    np.testing.assert_allclose(gray[0, 0], values[0] / 65535.0, rtol=1e-6)
    rgb = _single_pixel_value(tmp_path, image, ["N", 3, 4, 4], name=f"a.{ext}")
    np.testing.assert_allclose(rgb[:, 0, :], np.stack([values[0] / 65535.0] * 3), rtol=1e-6)


def test_sixteen_bit_is_resized_in_float(tmp_path):
    values = np.tile(np.array([0, 65535], dtype=np.uint16), (2, 1))
    gray = _single_pixel_value(tmp_path, Image.fromarray(values), ["N", 1, 1, 1])
    assert gray[0, 0, 0] == pytest.approx(0.5, abs=1e-6)


def test_float_tiff_is_skipped_as_unsupported(tmp_path):
    Image.fromarray(np.ones((4, 4), np.float32), mode="F").save(tmp_path / "f.tif")
    write_images(tmp_path, 2, size=(4, 4))
    cs = load_all(tmp_path, ["N", 3, 4, 4])
    assert cs.skipped["unsupported_mode"] == 1
    assert cs.n_train + cs.n_selection == 2


def test_bgr_nhwc_and_normalisation(tmp_path):
    image = Image.new("RGB", (5, 6), (10, 20, 30))
    value = _single_pixel_value(
        tmp_path, image, ["N", 6, 5, 3], scale=0.5, mean=(1, 2, 3), std=(2, 4, 8), channel_order="bgr"
    )
    assert value.shape == (6, 5, 3)  # NHWC
    np.testing.assert_allclose(value[0, 0], [(15 - 1) / 2, (10 - 2) / 4, (5 - 3) / 8])


def test_resize_without_crop_squashes_to_input_size(tmp_path):
    image = Image.fromarray(np.arange(8 * 6, dtype=np.uint8).reshape(6, 8) * 5).convert("RGB")
    value = _single_pixel_value(tmp_path, image, ["N", 3, 3, 4], scale=1.0)
    expected = np.asarray(image.resize((4, 3), Image.BILINEAR), np.float32).transpose(2, 0, 1)
    np.testing.assert_array_equal(value, expected)


def test_resize_then_center_crop_to_input_size(tmp_path):
    image = Image.fromarray(np.arange(20 * 10, dtype=np.uint8).reshape(10, 20)).convert("RGB")
    value = _single_pixel_value(tmp_path, image, ["N", 3, 5, 5], resize=5, scale=1.0)
    resized = image.resize((10, 5), Image.BILINEAR)
    expected = np.asarray(resized.crop((2, 0, 7, 5)), np.float32).transpose(2, 0, 1)  # round(2.5) == 2
    np.testing.assert_array_equal(value, expected)


def test_crop_larger_than_image_pads_with_zeros(tmp_path):
    image = Image.new("RGB", (4, 4), (255, 255, 255))
    value = _single_pixel_value(tmp_path, image, ["N", 3, 6, 6], crop=6, scale=1 / 255)
    assert value[0, 0, 0] == 0.0 and value[0, 1, 1] == 1.0 and value[0, 5, 5] == 0.0


def test_imagenet_preset_matches_torchvision(tmp_path):
    from torchvision import transforms

    rng = np.random.default_rng(1)
    sizes = [(301, 257), (255, 300), (517, 231), (224, 224), (250, 333)]
    for i, (w, h) in enumerate(sizes):
        random_rgb(rng, h, w).save(tmp_path / f"{i}.jpg", quality=90)
    cs = load_calibration(
        tmp_path, make_model(["N", 3, 224, 224]), preprocess=PreprocessConfig(preset="imagenet", workers=0),
        selection_size=2,
    )
    reference = transforms.Compose([
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    expected = {}
    for i in range(len(sizes)):
        with Image.open(tmp_path / f"{i}.jpg") as img:
            expected[i] = reference(img.convert("RGB")).numpy()
    got = np.concatenate([cs.selection["x"], cs.train["x"]])
    assert got.shape == (len(sizes), 3, 224, 224)
    # The split order is a seeded permutation: match every sample to its reference.
    matched = set()
    for sample in got:
        hits = [i for i, ref in expected.items() if np.allclose(sample, ref, atol=1e-5, rtol=0)]
        assert len(hits) == 1
        matched.add(hits[0])
    assert matched == set(expected)


# --- folders ------------------------------------------------------------------------------------


def test_recursive_search_ignores_hidden_and_other_files(tmp_path):
    write_images(tmp_path / "a" / "b", 2, size=(4, 4))
    write_images(tmp_path / "c", 1, size=(4, 4), ext="jpg")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / ".hidden").mkdir()
    write_images(tmp_path / ".hidden", 5, size=(4, 4))
    (tmp_path / "._img.jpg").write_bytes(b"AppleDouble junk")
    cs = load_all(tmp_path, ["N", 3, 4, 4])
    assert cs.n_train + cs.n_selection == 3
    assert sum(cs.skipped.values()) == 0
    assert cs.pipeline["source"] == {"kind": "image folder", "path": str(tmp_path), "files": 3}


def test_workers_give_identical_results(tmp_path):
    write_images(tmp_path, 12, size=(9, 7))
    in_process = load_all(tmp_path, ["N", 3, 5, 5], resize=6, workers=0)
    pooled = load_all(tmp_path, ["N", 3, 5, 5], resize=6, workers=2)
    np.testing.assert_array_equal(in_process.train["x"], pooled.train["x"])
    np.testing.assert_array_equal(in_process.selection["x"], pooled.selection["x"])
    assert pooled.pipeline["decode"]["workers"] == 2


def test_fewer_than_two_images(tmp_path):
    write_images(tmp_path, 1)
    with pytest.raises(OnnxSparseError, match="has 1 image file; calibration needs at least 2"):
        load_all(tmp_path, ["N", 3, 10, 12])


def test_image_folder_needs_an_image_input(tmp_path):
    write_images(tmp_path, 3)
    with pytest.raises(OnnxSparseError, match="not a 4-D image input"):
        load_all(tmp_path, ["N", 10])
    with pytest.raises(OnnxSparseError, match="dynamic height or width"):
        load_all(tmp_path, ["N", 3, "H", "W"])


# --- bad files ----------------------------------------------------------------------------------


def _bad_files(folder: Path) -> None:
    (folder / "garbage.jpg").write_bytes(b"this is not an image" * 10)
    (folder / "empty.png").write_bytes(b"")
    good = folder / "img000.png"
    (folder / "truncated.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    jpeg = folder / "whole.jpg"
    random_rgb(np.random.default_rng(5), 64, 64).save(jpeg, quality=95)
    data = jpeg.read_bytes()
    jpeg.unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    png_header_only(folder / "bomb.png", 50_000, 50_000)


def test_bad_files_are_skipped_and_counted(tmp_path, caplog):
    write_images(tmp_path, 4, size=(8, 8))
    _bad_files(tmp_path)
    with caplog.at_level(logging.WARNING):
        cs = load_all(tmp_path, ["N", 3, 8, 8], workers=2)
    assert cs.n_train + cs.n_selection == 4
    assert cs.skipped == {"unreadable": 2, "truncated": 2, "too_large": 1, "unsupported_mode": 0}
    assert cs.pipeline["skipped"] == cs.skipped
    assert "skipped 5 of 9 image files (2 unreadable, 2 truncated, 1 too_large)" in caplog.text


def test_decompression_bomb_skipped_even_without_pillow_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    write_images(tmp_path, 2, size=(8, 8))
    png_header_only(tmp_path / "bomb.png", 50_000, 50_000)
    cs = load_all(tmp_path, ["N", 3, 8, 8])
    assert cs.skipped["too_large"] == 1
    assert Image.MAX_IMAGE_PIXELS is None  # global left as it was


def test_pillow_limit_is_not_changed(tmp_path):
    before = Image.MAX_IMAGE_PIXELS
    write_images(tmp_path, 2, size=(8, 8))
    load_all(tmp_path, ["N", 3, 8, 8], max_pixels=64)
    assert Image.MAX_IMAGE_PIXELS == before


def test_max_pixels_limit(tmp_path):
    write_images(tmp_path, 3, size=(8, 8))
    with pytest.raises(OnnxSparseError, match=r"none of the 3 image files .* could be decoded \(3 too_large\)"):
        load_all(tmp_path, ["N", 3, 8, 8], max_pixels=63)


def test_all_bad_files_is_an_error(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"nope")
    (tmp_path / "b.png").write_bytes(b"")
    with pytest.raises(OnnxSparseError, match=r"none of the 2 image files .* \(2 unreadable\); first: .*a.jpg"):
        load_all(tmp_path, ["N", 3, 8, 8])


def test_one_readable_image_is_too_few(tmp_path):
    write_images(tmp_path, 1, size=(8, 8))
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    with pytest.raises(OnnxSparseError, match=r"readable images\) has 1 usable sample"):
        load_all(tmp_path, ["N", 3, 8, 8])


def test_bad_files_are_replaced_when_subsampling(tmp_path):
    write_images(tmp_path, 10, size=(8, 8))
    for i in range(4):
        (tmp_path / f"bad{i}.jpg").write_bytes(b"nope")
    cs = load_calibration(
        tmp_path, make_model(["N", 3, 8, 8]), preprocess=PreprocessConfig(workers=0), max_samples=8, selection_size=3
    )
    assert (cs.n_train, cs.n_selection) == (5, 3)
    assert cs.skipped["unreadable"] <= 4


def test_augment_flag_for_images(tmp_path):
    write_images(tmp_path, 4, size=(8, 8))
    assert load_all(tmp_path, ["N", 3, 8, 8]).augment is True
    assert load_all(tmp_path, ["N", 3, 8, 8], augment=False).augment is False


def test_decoded_values_are_cached_float32(tmp_path):
    write_images(tmp_path, 4, size=(8, 8))
    cs = load_all(tmp_path, ["N", 3, 8, 8])
    assert cs.train["x"].dtype == np.float32 and cs.train["x"].flags.c_contiguous
    assert torch.from_numpy(cs.train["x"]).shape == (3, 3, 8, 8)


def test_decoded_cache_is_capped_without_max_samples(tmp_path, monkeypatch, caplog):
    from onnxsparse.data import calibration

    monkeypatch.setattr(calibration, "DEFAULT_IMAGE_CACHE_BYTES", 4 * 3 * 8 * 8 * 6)  # six samples
    write_images(tmp_path, 10, size=(8, 8))
    with caplog.at_level(logging.INFO):
        cs = load_calibration(tmp_path, make_model(["N", 3, 8, 8]), preprocess=PreprocessConfig(workers=0))
    assert (cs.n_train, cs.n_selection) == (4, 2)
    assert "using 6 of 10 samples" in caplog.text
    cs = load_calibration(
        tmp_path, make_model(["N", 3, 8, 8]), preprocess=PreprocessConfig(workers=0), max_samples=10
    )
    assert cs.n_train + cs.n_selection == 10


FASHION_CALIB = Path(__file__).resolve().parents[1] / "samples" / "fashion_mnist" / "calib"


@pytest.mark.skipif(not FASHION_CALIB.is_dir(), reason="samples/fashion_mnist/calib does not exist")
@pytest.mark.parametrize("workers", [0, 2])
def test_fashion_mnist_calib_decoding_speed(workers, capsys):
    cs = load_calibration(
        FASHION_CALIB, make_model(["batch", 1, 28, 28]), preprocess=PreprocessConfig(workers=workers)
    )
    decode = cs.pipeline["decode"]
    with capsys.disabled():
        print(
            f"\n{FASHION_CALIB}: {decode['images']} images in {decode['seconds']:.2f} s, "
            f"{decode['images_per_second']:.0f} images/s ({workers} workers)"
        )
    assert sum(cs.skipped.values()) == 0
    assert cs.train["x"].shape[1:] == (1, 28, 28)
    assert 0.0 <= cs.train["x"].min() and cs.train["x"].max() <= 1.0
