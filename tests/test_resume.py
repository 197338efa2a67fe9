"""Checkpoints and --resume: an interrupted run continued from its run directory writes the same model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import graphs
import onnxsparse.checkpoint as checkpoint
from onnxsparse import OnnxSparseError, PruneConfig, UniPTSConfig, prune
from onnxsparse_cli.main import main

CONFIG = PruneConfig(
    sparsity=0.8, method="unipts", seed=1, device="cpu", checkpoint_every=1, batch_size=16,
    unipts=UniPTSConfig(population=4, generations=2, parents=2, crossover=1, mutation=1, iterations=12,
                        fitness_samples=32),
)


@pytest.fixture()
def setup(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(graphs.export_torch(graphs.tiny_cnn(), keep_bn=True), str(model))
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((48, 1, 12, 12)).astype(np.float32))
    return tmp_path, model, calib


def _tensors(path):
    return {i.name: numpy_helper.to_array(i).tobytes() for i in onnx.load(str(path)).graph.initializer}


def _interrupted_then_resumed(monkeypatch, model, out, calib, config, run_dir):
    """A run stopped (Ctrl-C) right after its first training checkpoint, then resumed from its run directory."""
    real_save = checkpoint.RunDir.save

    def save_then_die(self, name, state):
        real_save(self, name, state)
        if name == "training":
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.RunDir, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        prune(model, out, calib, config, run_dir=run_dir, progress=False)
    assert not out.exists()
    monkeypatch.setattr(checkpoint.RunDir, "save", real_save)
    return prune(model, out, calib, config, run_dir=run_dir, resume=True, progress=False)


def test_resumed_run_equals_uninterrupted_run(setup, monkeypatch):
    tmp, model, calib = setup
    whole = prune(model, tmp / "a.onnx", calib, CONFIG, run_dir=tmp / "run-a", progress=False)
    assert (tmp / "run-a" / "allocation.pt").is_file() and (tmp / "run-a" / "training.pt").is_file()

    resumed = _interrupted_then_resumed(monkeypatch, model, tmp / "b.onnx", calib, CONFIG, tmp / "run-b")

    info = resumed.report["method_info"]["resumed"]
    assert info["allocation"] is True and 0 < info["training_step"] < 12
    assert _tensors(tmp / "a.onnx") == _tensors(tmp / "b.onnx")
    def curve(result):  # wall-clock seconds aside, the training history is the same
        return [{k: v for k, v in row.items() if k != "seconds"} for row in result.report["method_info"]["training"]["curve"]]

    assert len(curve(whole)) > 1 and curve(whole) == curve(resumed)


@pytest.mark.slow
def test_resumed_run_of_the_counted_plan_gives_the_same_model(tmp_path, monkeypatch):
    """The recipe's own plan (no --epochs): the resumed run plans the same iterations and base decay from the same
    counts as the uninterrupted one, and ends with the same tensors."""
    model = tmp_path / "m.onnx"
    onnx.save(graphs.export_torch(graphs.tiny_cnn()), str(model))
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((200, 1, 12, 12)).astype(np.float32))
    config = PruneConfig(sparsity=0.8, seed=1, device="cpu", checkpoint_every=20, batch_size=16, selection_size=24,
                         unipts=UniPTSConfig(population=4, generations=1, parents=2, crossover=1, mutation=1,
                                             fitness_samples=32))
    whole = prune(model, tmp_path / "a.onnx", calib, config, run_dir=tmp_path / "run-a", progress=False)
    training = whole.report["method_info"]["training"]
    assert training["iterations"] == whole.report["method_info"]["allocation"]["plan"]["iterations"]

    resumed = _interrupted_then_resumed(monkeypatch, model, tmp_path / "b.onnx", calib, config, tmp_path / "run-b")
    again = resumed.report["method_info"]["training"]
    assert again["gamma"] == training["gamma"] and again["iterations"] == training["iterations"]
    assert _tensors(tmp_path / "a.onnx") == _tensors(tmp_path / "b.onnx")


def test_run_directory_guards(setup):
    tmp, model, calib = setup
    prune(model, None, calib, CONFIG, run_dir=tmp / "run", progress=False)
    with pytest.raises(OnnxSparseError, match="already holds a run; pass --resume"):
        prune(model, None, calib, CONFIG, run_dir=tmp / "run", progress=False)
    other = PruneConfig(**{**CONFIG.__dict__, "sparsity": 0.5})
    with pytest.raises(OnnxSparseError, match="different config"):
        prune(model, None, calib, other, run_dir=tmp / "run", resume=True, progress=False)
    with pytest.raises(OnnxSparseError, match="run.json missing"):
        prune(model, None, calib, CONFIG, run_dir=tmp / "nothing", resume=True, progress=False)


def test_checkpoint_refuses_pickled_objects(tmp_path):
    import pickle

    run = checkpoint.RunDir(tmp_path / "r", {"k": 1}, resume=False)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "r" / "training.pt").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(OnnxSparseError, match="cannot be read safely"):
        run.load("training")


def test_cli_resume_flag(setup):
    tmp, model, calib = setup
    args = ["prune", str(model), "--sparsity", "0.8", "--calib", str(calib), "--method", "unipts", "-q",
            "--iterations", "4", "--search-generations", "1", "--population", "6", "--batch-size", "8",
            "--checkpoint-every", "1"]
    first = CliRunner().invoke(main, [*args, "-o", str(tmp / "c.onnx"), "--run-dir", str(tmp / "run")])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(main, [*args, "-o", str(tmp / "d.onnx"), "--resume", str(tmp / "run")])
    assert again.exit_code == 0, again.output
    assert _tensors(tmp / "c.onnx") == _tensors(tmp / "d.onnx")
