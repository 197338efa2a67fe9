"""Tensor sources: .npy/.npz files and folders, feed dicts, readers, iterables, torch datasets."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from onnxsparse.data import PreprocessConfig
from onnxsparse.data import load_calibration as _load_calibration
from onnxsparse.errors import OnnxSparseError


def load_calibration(*args, **kwargs):
    """These tests are about reading sources: no verification split unless a test asks for one (the three-way
    split has its own tests in test_data_calibration.py)."""
    kwargs.setdefault("verify_size", 0)
    return _load_calibration(*args, **kwargs)


def make_model(inputs: dict[str, list], dtype=TensorProto.FLOAT) -> onnx.ModelProto:
    values = [helper.make_tensor_value_info(name, dtype, shape) for name, shape in inputs.items()]
    outputs = [helper.make_tensor_value_info(f"{name}_out", dtype, shape) for name, shape in inputs.items()]
    nodes = [helper.make_node("Identity", [name], [f"{name}_out"]) for name in inputs]
    return helper.make_model(helper.make_graph(nodes, "g", values, outputs))


IMAGE = make_model({"x": ["N", 3, 4, 4]})
TWO = make_model({"a": ["N", 3, 4, 4], "b": ["N", 5]})


def samples(n, shape=(3, 4, 4), seed=0, dtype=np.float32):
    # Sample i holds the value i everywhere, so every sample can be traced through the split.
    return (np.arange(n, dtype=np.float64).reshape(-1, *([1] * len(shape))) + np.zeros(shape)).astype(dtype)


def ids(cs, split, name="x"):
    array = getattr(cs, split)[name]
    return sorted(int(v) for v in array.reshape(len(array), -1)[:, 0])


def test_single_npy_batch(tmp_path):
    np.save(tmp_path / "calib.npy", samples(10))
    cs = load_calibration(tmp_path / "calib.npy", IMAGE, selection_size=3)
    assert (cs.n_train, cs.n_selection) == (7, 3)
    assert sorted(ids(cs, "train") + ids(cs, "selection")) == list(range(10))
    assert cs.augment is False and cs.skipped == {}
    assert cs.pipeline["source"]["kind"] == "npy file"


def test_npy_folder_of_samples_and_batches(tmp_path):
    (tmp_path / "sub").mkdir()
    np.save(tmp_path / "a.npy", samples(1)[0])  # one sample, rank 3
    np.save(tmp_path / "sub" / "b.npy", samples(4) + 1)  # a batch of 4, rank 4
    np.save(tmp_path / "c.npy", samples(1, dtype=np.float64)[0] + 5)
    cs = load_calibration(tmp_path, IMAGE, selection_size=2)
    assert sorted(ids(cs, "train") + ids(cs, "selection")) == [0, 1, 2, 3, 4, 5]
    assert cs.train["x"].dtype == np.float32
    assert cs.pipeline["source"] == {"kind": "tensor folder", "path": str(tmp_path), "files": 3}


def test_single_npz_file_for_multi_input_model(tmp_path):
    np.savez(tmp_path / "calib.npz", a=samples(6), b=np.ones((6, 5), np.float32), label=np.zeros(6))
    cs = load_calibration(tmp_path / "calib.npz", TWO, selection_size=2)
    assert cs.input_names == ("a", "b")
    assert cs.train["a"].shape == (4, 3, 4, 4) and cs.train["b"].shape == (4, 5)
    assert cs.selection["b"].shape == (2, 5)


def test_npz_folder_keyed_by_input_name(tmp_path):
    for i in range(3):
        np.savez(tmp_path / f"s{i}.npz", b=np.full((5,), i, np.float32), a=samples(1)[0] + i)
    cs = load_calibration(tmp_path, TWO, selection_size=1)
    # Samples stay aligned across inputs.
    for split in ("train", "selection"):
        arrays = getattr(cs, split)
        np.testing.assert_array_equal(arrays["a"][:, 0, 0, 0], arrays["b"][:, 0])


def test_npz_missing_input(tmp_path):
    np.savez(tmp_path / "s.npz", a=samples(2))
    with pytest.raises(OnnxSparseError, match=r"s.npz has no entry for input\(s\) 'b'; it has 'a'"):
        load_calibration(tmp_path, TWO)


def test_npz_with_one_array_for_single_input_model(tmp_path):
    np.savez(tmp_path / "s.npz", samples(3))  # key "arr_0"
    cs = load_calibration(tmp_path / "s.npz", IMAGE, selection_size=1)
    assert cs.n_train == 2


def test_npy_folder_for_multi_input_model(tmp_path):
    np.save(tmp_path / "a.npy", samples(3))
    with pytest.raises(OnnxSparseError, match="a .npy file feeds one input, but the model has 2 inputs"):
        load_calibration(tmp_path, TWO)


@pytest.mark.parametrize(
    "array, match",
    [
        (np.zeros((4, 3, 5, 4), np.float32), r"dimension 2 is 5, expected 4"),
        (np.zeros((4, 4, 4, 3), np.float32), r"dimension 1 is 4, expected 3"),
        (np.zeros((4, 48), np.float32), r"give one sample of rank 3 or a batch of rank 4"),
        (np.zeros((2, 2, 3, 4, 4), np.float32), r"shape \(2, 2, 3, 4, 4\)"),
    ],
)
def test_npy_wrong_shape(tmp_path, array, match):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(OnnxSparseError, match="bad.npy: input 'x' .*" + match):
        load_calibration(tmp_path, IMAGE)


@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.bool_, np.complex64])
def test_npy_wrong_dtype(tmp_path, dtype):
    np.save(tmp_path / "bad.npy", np.zeros((4, 3, 4, 4), dtype))
    with pytest.raises(OnnxSparseError, match=f"has dtype {np.dtype(dtype)}; calibration tensors must be floating"):
        load_calibration(tmp_path / "bad.npy", IMAGE)


def test_npy_float16_accepted(tmp_path):
    np.save(tmp_path / "h.npy", samples(4, dtype=np.float16))
    assert load_calibration(tmp_path / "h.npy", IMAGE, selection_size=1).train["x"].dtype == np.float32


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_rejected(tmp_path, bad):
    array = samples(4)
    array[2, 1, 0, 0] = bad
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(OnnxSparseError, match=r"bad.npy: input 'x' has 1 NaN/Inf value\(s\) \(first in sample 2\)"):
        load_calibration(tmp_path / "bad.npy", IMAGE)


def test_float64_overflow_is_caught(tmp_path):
    array = samples(3, dtype=np.float64)
    array[0, 0, 0, 0] = 1e300
    np.save(tmp_path / "big.npy", array)
    with pytest.raises(OnnxSparseError, match="NaN/Inf value.*after conversion to float32"):
        load_calibration(tmp_path / "big.npy", IMAGE)


def test_pickled_and_corrupt_files(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(OnnxSparseError, match="holds Python objects"):
        load_calibration(tmp_path / "obj.npy", IMAGE)
    (tmp_path / "broken.npz").write_bytes(b"PK not really a zip")
    with pytest.raises(OnnxSparseError, match="cannot read .*broken.npz as a .npz archive"):
        load_calibration(tmp_path / "broken.npz", IMAGE)
    (tmp_path / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(OnnxSparseError, match="cannot read .*broken.npy as a .npy array"):
        load_calibration(tmp_path / "broken.npy", IMAGE)


def test_npy_file_named_npz_is_a_user_error(tmp_path):
    np.save(tmp_path / "a.npy", samples(3))
    (tmp_path / "a.npy").rename(tmp_path / "a.npz")
    with pytest.raises(OnnxSparseError, match="a.npz is a .npy array, not a .npz archive; rename it to .npy"):
        load_calibration(tmp_path / "a.npz", IMAGE)


def test_samples_with_different_dynamic_shapes(tmp_path):
    model = make_model({"x": ["N", 3, "H", "W"]})
    np.save(tmp_path / "a.npy", np.zeros((2, 3, 4, 4), np.float32))
    np.save(tmp_path / "b.npy", np.zeros((2, 3, 5, 5), np.float32))
    with pytest.raises(OnnxSparseError, match=r"b.npy: input 'x' samples have shape \(3, 5, 5\), but a.npy has"):
        load_calibration(tmp_path, model)


def test_mixed_folder_is_an_error(tmp_path):
    np.save(tmp_path / "a.npy", samples(2))
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "b.png")
    with pytest.raises(OnnxSparseError, match=r"holds both image files \(1\) and .npy/.npz files \(1"):
        load_calibration(tmp_path, IMAGE)


def test_preprocessing_options_are_ignored_with_warning(tmp_path, caplog):
    np.save(tmp_path / "a.npy", samples(4))
    with caplog.at_level(logging.WARNING):
        cs = load_calibration(tmp_path / "a.npy", IMAGE, preprocess=PreprocessConfig(preset="imagenet", mean=0.5))
    assert "preset, mean are ignored" in caplog.text
    assert cs.pipeline["ignored_options"] == ["preset", "mean"]
    assert cs.augment is False


def test_non_image_inputs_from_tensors(tmp_path):
    model = make_model({"tokens": ["N", 16]})
    cs = load_calibration({"tokens": np.random.default_rng(0).normal(size=(40, 16))}, model)
    assert cs.n_selection == 13 and cs.n_train == 27  # default selection, capped at a third
    assert cs.pipeline["source"] == {"kind": "feed dict"}


def test_unsupported_model_input_dtype_is_an_error():
    model = make_model({"s": ["N", 4]}, dtype=TensorProto.COMPLEX64)
    with pytest.raises(OnnxSparseError, match="input 's' is a complex64 tensor; onnxsparse calibrates models whose"):
        load_calibration({"s": np.zeros((4, 4), np.complex64)}, model)


def _token_model() -> onnx.ModelProto:
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "S"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT32, ["N", "S"])
    keep = helper.make_tensor_value_info("keep", TensorProto.BOOL, ["N"])
    outs = [helper.make_tensor_value_info(f"{v.name}_out", v.type.tensor_type.elem_type, None) for v in (ids, mask, keep)]
    nodes = [helper.make_node("Identity", [v.name], [f"{v.name}_out"]) for v in (ids, mask, keep)]
    return helper.make_model(helper.make_graph(nodes, "g", [ids, mask, keep], outs))


def _token_feed(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    big = np.int64(2**40)  # beyond float32's exact integers: any float round trip would change it
    ids = rng.integers(0, 30000, (n, 7)).astype(np.int64) + big
    return {"input_ids": ids, "attention_mask": (rng.random((n, 7)) > 0.3).astype(np.int64),
            "keep": rng.random(n) > 0.5}


@pytest.mark.parametrize("source", ["npz", "npz_folder", "dict", "reader", "iterable"])
def test_integer_inputs_are_kept_exact(tmp_path, source):
    model = _token_model()
    feed = _token_feed(12)
    if source == "npz":
        np.savez(tmp_path / "calib.npz", **feed)
        data = tmp_path / "calib.npz"
    elif source == "npz_folder":
        for i in range(0, 12, 4):
            np.savez(tmp_path / f"part{i:02d}.npz", **{k: v[i:i + 4] for k, v in feed.items()})
        data = tmp_path
    elif source == "dict":
        data = feed
    else:
        items = [{k: v[i:i + 3] for k, v in feed.items()} for i in range(0, 12, 3)]
        if source == "iterable":
            data = items
        else:
            class Reader:
                def __init__(self):
                    self.it = iter(items)

                def get_next(self):
                    return next(self.it, None)

            data = Reader()
    cs = load_calibration(data, model, selection_size=4, preprocess=PreprocessConfig(mean=(0.5,), std=(0.2,)))
    assert cs.train["input_ids"].dtype == np.int64 and cs.train["attention_mask"].dtype == np.int32
    assert cs.train["keep"].dtype == np.bool_
    order = np.concatenate([np.flatnonzero((feed["input_ids"] == row).all(axis=1)) for row in cs.selection["input_ids"]])
    for name in ("input_ids", "attention_mask", "keep"):
        np.testing.assert_array_equal(cs.selection[name], feed[name][order].astype(cs.selection[name].dtype))
    feeds = next(cs.feeds("train", 8))
    assert feeds["input_ids"].dtype == np.int64 and feeds["attention_mask"].dtype == np.int32
    batch = next(cs.batches("train", 8, shuffle=True, seed=0, augment=True))
    assert batch[0].dtype == torch.int64 and int(batch[0].min()) >= 2**40


def test_integer_inputs_refuse_floats_and_out_of_range_values(tmp_path):
    model = _token_model()
    feed = _token_feed(6)
    with pytest.raises(OnnxSparseError, match="input 'input_ids' has dtype float32; the model declares it int64"):
        load_calibration({**feed, "input_ids": feed["input_ids"].astype(np.float32)}, model)
    with pytest.raises(OnnxSparseError, match=r"'attention_mask' holds values in \[0, 4294967297\], outside .* int32"):
        load_calibration({**feed, "attention_mask": feed["attention_mask"] + 2**32 * (feed["attention_mask"] > 0)}, model)
    with pytest.raises(OnnxSparseError, match="'keep' is declared bool but holds values other than 0 and 1"):
        load_calibration({**feed, "keep": np.full(6, 2, np.int64)}, model)
    ids_only = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["ids"], ["out"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("out", TensorProto.INT64, None)]))
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(OnnxSparseError, match="input 'ids' is a int64 tensor, not an image"):
        load_calibration(tmp_path, ids_only)


# --- Python objects -----------------------------------------------------------------------------


class Reader:
    """onnxruntime CalibrationDataReader protocol: get_next() returns a feed dict or None."""

    def __init__(self, batches):
        self.batches = list(batches)
        self.calls = 0

    def get_next(self):
        self.calls += 1
        return self.batches.pop(0) if self.batches else None


def test_reader_protocol_is_read_once():
    reader = Reader([{"x": samples(3)}, {"x": samples(2)[0]}, {"x": torch.from_numpy(samples(4))}])
    cs = load_calibration(reader, IMAGE, selection_size=2)
    assert cs.n_train + cs.n_selection == 8
    assert reader.calls == 4
    # The data is cached: iterating again does not touch the reader.
    list(cs.batches("train", 2, shuffle=True, seed=0))
    assert reader.calls == 4
    assert cs.pipeline["source"] == {"kind": "reader", "type": "Reader"}


def test_reader_with_rewind_is_rewound_after_reading():
    class Rewindable(Reader):
        def __init__(self, batches):
            super().__init__(batches)
            self.original = list(batches)
            self.rewound = 0

        def rewind(self):
            self.rewound += 1
            self.batches = list(self.original)

    reader = Rewindable([{"x": samples(3)}])
    load_calibration(reader, IMAGE, selection_size=1)
    assert reader.rewound == 1 and len(reader.batches) == 1


def test_empty_reader():
    with pytest.raises(OnnxSparseError, match="the reader has 0 usable sample"):
        load_calibration(Reader([]), IMAGE)


def test_reader_with_wrong_keys():
    with pytest.raises(OnnxSparseError, match=r"reader item 0 has no entry for input\(s\) 'b'"):
        load_calibration(Reader([{"a": samples(2), "c": np.zeros((2, 5))}]), TWO)


def test_iterable_of_feed_dicts_and_generator():
    feeds = [{"a": samples(2), "b": np.ones((2, 5))} for _ in range(3)]
    cs = load_calibration(feeds, TWO, selection_size=2)
    assert cs.n_train == 4
    cs = load_calibration((f for f in feeds), TWO, selection_size=2, max_samples=3)
    assert (cs.n_train, cs.n_selection) == (1, 2)


def test_stream_stops_at_max_samples():
    consumed = []

    def endless():
        i = 0
        while True:
            consumed.append(i)
            yield {"x": samples(1)[0] + i}
            i += 1

    cs = load_calibration(endless(), IMAGE, max_samples=7, selection_size=2)
    assert (cs.n_train, cs.n_selection) == (5, 2)
    assert len(consumed) == 7


def test_batch_size_mismatch_between_inputs():
    with pytest.raises(OnnxSparseError, match="inputs have different batch sizes: a 2, b 3"):
        load_calibration([{"a": samples(2), "b": np.ones((3, 5))}], TWO)


def test_array_source_and_bad_items():
    cs = load_calibration(samples(5), IMAGE, selection_size=1)
    assert cs.n_train == 4
    with pytest.raises(OnnxSparseError, match="single array but the model has 2 inputs"):
        load_calibration(samples(5), TWO)
    with pytest.raises(OnnxSparseError, match="list item 0 is a str"):
        load_calibration(["not a feed"], IMAGE)
    with pytest.raises(OnnxSparseError, match="unsupported calibration source of type int"):
        load_calibration(42, IMAGE)
    with pytest.raises(OnnxSparseError, match="has dtype <U1; calibration tensors must be floating"):
        load_calibration([{"x": ["a", "b"]}], IMAGE)
    with pytest.raises(OnnxSparseError, match="not a numeric array"):
        load_calibration([{"x": [object(), None]}], IMAGE)


class PairDataset(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n
        self.reads = []

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        self.reads.append(index)
        return torch.full((3, 4, 4), float(index)), index % 10  # (image, label)


def test_torch_dataset_reads_only_what_the_split_needs():
    dataset = PairDataset(100)
    cs = load_calibration(dataset, IMAGE, max_samples=10, selection_size=4, seed=3)
    assert (cs.n_train, cs.n_selection) == (6, 4)
    assert len(dataset.reads) == 10
    assert sorted(ids(cs, "train") + ids(cs, "selection")) == sorted(dataset.reads)
    again = load_calibration(PairDataset(100), IMAGE, max_samples=10, selection_size=4, seed=3)
    np.testing.assert_array_equal(cs.train["x"], again.train["x"])


def test_torch_dataloader_and_iterable_dataset():
    loader = torch.utils.data.DataLoader(PairDataset(10), batch_size=4)
    cs = load_calibration(loader, IMAGE, selection_size=3)
    assert cs.n_train + cs.n_selection == 10
    assert cs.pipeline["source"] == {"kind": "iterable", "type": "DataLoader"}

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter({"x": torch.zeros(3, 4, 4)} for _ in range(5))

    assert load_calibration(Stream(), IMAGE, selection_size=1).n_train == 4


def test_seeded_split_of_tensors_is_deterministic():
    a = load_calibration(samples(50), IMAGE, selection_size=10, seed=7)
    b = load_calibration(samples(50), IMAGE, selection_size=10, seed=7)
    c = load_calibration(samples(50), IMAGE, selection_size=10, seed=8)
    assert ids(a, "selection") == ids(b, "selection")
    assert ids(a, "selection") != ids(c, "selection")
    assert not set(ids(a, "selection")) & set(ids(a, "train"))
