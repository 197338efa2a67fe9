"""The click front end: happy paths and every user-error path prints one line, no traceback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import graphs
from onnxsparse_cli.main import main


@pytest.fixture()
def workspace(tmp_path):
    model = tmp_path / "tiny.onnx"
    onnx.save(graphs.export_torch(graphs.tiny_cnn()), str(model))
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        np.save(calib / f"{i}.npy", rng.standard_normal((16, 1, 12, 12)).astype(np.float32))
    return tmp_path, model, calib


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("onnxsparse: error:")]
    assert len(lines) == 1, result.output
    assert result.output.rstrip().endswith("FAILED")
    return lines[0]


@pytest.mark.parametrize("method", ["magnitude", "global-magnitude"])
def test_prune_writes_a_verified_model_and_report(workspace, method):
    tmp, model, calib = workspace
    out, report = tmp / "sparse.onnx", tmp / "report.json"
    result = _run("prune", model, "--sparsity", "0.6", "--calib", calib, "-o", out, "--method", method,
                  "--report", report)
    assert result.exit_code == 0, result.output
    assert result.output.rstrip().splitlines()[-1].startswith("PASSED: 60.00% of 1,960 prunable weights")
    data = json.loads(report.read_text())
    assert data["method"] == method and data["achieved_sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert data["verification"]["export_max_rel_error"] < 1e-4
    assert {row["name"] for row in data["layers"]} == {t["name"] for t in data["layers"]}
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["onnxsparse.method"] == method and float(props["onnxsparse.achieved_sparsity"]) == pytest.approx(0.6, abs=1e-3)


def test_prune_at_zero_sparsity_is_bit_identical(workspace):
    tmp, model, calib = workspace
    out = tmp / "same.onnx"
    result = _run("prune", model, "--sparsity", "0", "--calib", calib, "-o", out, "--method", "magnitude", "-q")
    assert result.exit_code == 0, result.output
    a, b = onnx.load(str(model)), onnx.load(str(out))
    for x, y in zip(a.graph.initializer, b.graph.initializer):
        assert x.name == y.name and numpy_helper.to_array(x).tobytes() == numpy_helper.to_array(y).tobytes()


def test_inspect_table_and_json(workspace):
    _, model, _ = workspace
    result = _run("inspect", model)
    assert result.exit_code == 0 and "Conv" in result.output and "1,960" in result.output
    data = json.loads(_run("inspect", model, "--json").output)
    assert data["params"] == 1960 and data["zeros"] == 0 and len(data["layers"]) == 4


def test_bad_sparsity(workspace):
    tmp, model, calib = workspace
    line = _error_line(_run("prune", model, "--sparsity", "1.2", "--calib", calib, "-o", tmp / "o.onnx"))
    assert "--sparsity must be in [0, 1), got 1.2" in line


def test_existing_output_needs_force(workspace):
    tmp, model, calib = workspace
    out = tmp / "exists.onnx"
    out.write_bytes(b"keep me")
    line = _error_line(_run("prune", model, "--sparsity", "0.5", "--calib", calib, "-o", out, "--method", "magnitude"))
    assert "already exists" in line and "--force" in line
    assert out.read_bytes() == b"keep me"
    ok = _run("prune", model, "--sparsity", "0.5", "--calib", calib, "-o", out, "--method", "magnitude", "--force")
    assert ok.exit_code == 0, ok.output


def test_output_may_not_be_the_input(workspace):
    _, model, calib = workspace
    before = model.read_bytes()
    line = _error_line(_run("prune", model, "--sparsity", "0.5", "--calib", calib, "-o", model, "--force"))
    assert "is the input model" in line
    assert model.read_bytes() == before


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (lambda tmp: ("missing.onnx", None), "does not exist"),
        (lambda tmp: ((tmp / "junk.onnx").write_bytes(b"\x08\x96\x01garbage") and "junk.onnx", None), "not a readable ONNX"),
    ],
)
def test_bad_model_files(workspace, setup, expected):
    tmp, _, calib = workspace
    name, _ = setup(tmp)
    line = _error_line(_run("prune", tmp / name, "--sparsity", "0.5", "--calib", calib, "-o", tmp / "o.onnx"))
    assert expected in line


def test_missing_calibration_and_output(workspace):
    tmp, model, calib = workspace
    line = _error_line(_run("prune", model, "--sparsity", "0.5", "--calib", tmp / "nope", "-o", tmp / "o.onnx",
                            "--method", "magnitude"))
    assert "nope" in line
    line = _error_line(_run("prune", model, "--sparsity", "0.5", "--calib", calib))
    assert "-o/--output is required" in line
    assert not (tmp / "o.onnx").exists()


def test_bad_option_values(workspace):
    tmp, model, calib = workspace
    base = ["prune", model, "--sparsity", "0.5", "--calib", calib, "-o", tmp / "o.onnx", "--method", "magnitude"]
    assert "--device must be" in _error_line(_run(*base, "--device", "tpu"))
    assert "--pattern" in _error_line(_run(*base, "--pattern", "4:2"))
    assert "--batch-size must be an integer >= 1, got 0" in _error_line(_run(*base, "--batch-size", "0"))
    assert "--scale" in _error_line(_run(*base, "--scale", "abc"))


def test_skipped_weights_are_listed(tmp_path):
    """Weights the tool does not prune are named in the summary with the reason; integer inputs from .npz."""
    model = tmp_path / "tokens.onnx"
    onnx.save(graphs.einsum_and_embedding(), str(model))
    calib = tmp_path / "calib.npz"
    np.savez(calib, ids=np.random.default_rng(0).integers(0, 20, (16, 5)))
    out, report = tmp_path / "sparse.onnx", tmp_path / "report.json"
    result = _run("prune", model, "--sparsity", "0.5", "--calib", calib, "-o", out, "--method", "magnitude",
                  "--report", report)
    assert result.exit_code == 0, result.output
    assert "skipped embedding (Gather): embedding table read by Gather is not pruned" in result.output
    assert "skipped einsum (Einsum): Einsum weights are not pruned" in result.output
    data = json.loads(report.read_text())
    assert [s["tensor"] for s in data["skipped_layers"]] == ["embed", "E"]
    assert [row["name"] for row in data["layers"]] == ["fc.w"] and data["layers"][0]["zeros"] == 3


@pytest.mark.parametrize("args, recipe, field, expected", [
    ([], "quick", "augment", False), (["--augment"], "quick", "augment", True), ([], "paper", "augment", True),
    (["--no-augment"], "paper", "augment", False), ([], "quick", "feature_weight", 1.0),
    ([], "paper", "feature_weight", 0.0), (["--feature-weight", "0"], "quick", "feature_weight", 0.0),
    (["--feature-weight", "2.5"], "paper", "feature_weight", 2.5),
])
def test_recipe_options_reach_the_config(workspace, monkeypatch, args, recipe, field, expected):
    tmp_path, model, calib = workspace
    seen = {}

    def fake_prune(model, output, calib, config, **kwargs):
        seen["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr("onnxsparse.pipeline.prune", fake_prune)
    result = _run("prune", model, "--sparsity", "0.5", "--calib", calib, "-o", tmp_path / "o.onnx",
                  "--recipe", recipe, *args)
    assert result.exit_code == 0, result.output
    assert getattr(seen["config"].unipts, field) == expected


def test_negative_feature_weight_is_a_user_error(workspace):
    tmp_path, model, calib = workspace
    result = _run("prune", model, "--sparsity", "0.5", "--calib", calib, "-o", tmp_path / "o.onnx",
                  "--feature-weight", "-1")
    assert result.exit_code != 0 and "--feature-weight must be in [0, 1000], got -1" in result.output
    assert "Traceback" not in result.output


def test_prune_help_fits_one_screen_and_every_expert_option_is_documented():
    import re

    short = CliRunner().invoke(main, ["prune", "--help"]).output
    assert len(short[short.index("Options:"):].splitlines()) - 1 <= 25
    full = CliRunner().invoke(main, ["prune", "--help-all"]).output
    flags = set(re.findall(r"^\s+(?:-\w, )?(--[\w-]+)", full, re.M))
    assert {"--time-budget", "--selection-size", "--verify-size", "--deterministic"} <= flags  # expert ones
    assert not {"--time-budget", "--selection-size"} & set(re.findall(r"^\s+(?:-\w, )?(--[\w-]+)", short, re.M))
    doc = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    assert [f for f in sorted(flags) if f not in doc] == []
