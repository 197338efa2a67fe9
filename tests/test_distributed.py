"""Data-parallel runs: the torchrun context, a 2-process gloo prune on the CPU against the 1-process run,
a failure on one rank stopping the other, and ``torchrun -m onnxsparse prune`` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.multiprocessing as mp

import graphs
from onnxsparse import PruneConfig, prune
from onnxsparse.config import UniPTSConfig
from onnxsparse.distributed import EXIT_PEER_FAILED, DistContext, context_from_env, session
from onnxsparse.errors import OnnxSparseError

ROOT = Path(__file__).resolve().parents[1]


def _config() -> PruneConfig:
    return PruneConfig(sparsity=0.7, seed=0, device="cpu", batch_size=16, selection_size=32, verify_size=32,
                       unipts=UniPTSConfig(generations=3, population=6, parents=2, crossover=2, mutation=2,
                                           iterations=24, fitness_samples=32))


def _calib() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"input": rng.standard_normal((16, 1, 12, 12)).astype(np.float32)} for _ in range(8)]


def _rank_main(rank: int, world: int, store_path: str, model_path: str, out_dir: str, fail_rank: int) -> None:
    torch.set_num_threads(1)
    ctx = DistContext(rank, world, torch.device("cpu"), "gloo")
    store = torch.distributed.FileStore(store_path, world)
    out = Path(out_dir)
    try:
        with session(ctx, store=store, timeout_s=120):
            if rank == fail_rank:
                raise OnnxSparseError(f"rank {rank} cannot read its data")
            result = prune(model_path, out / "model.onnx", _calib(), _config(), progress=False,
                           report_path=out / "report.json" if ctx.is_main else None, dist=ctx)
            (out / f"rank{rank}.json").write_text(json.dumps({"output": str(result.output)}))
    except OnnxSparseError as exc:
        (out / f"error{rank}.txt").write_text(str(exc))
        raise SystemExit(3) from None


def _spawn(world: int, tmp: Path, model_path: Path, fail_rank: int = -1, timeout_s: float = 240) -> list[int | None]:
    spawn = mp.get_context("spawn")
    procs = [spawn.Process(target=_rank_main, args=(r, world, str(tmp / "store"), str(model_path), str(tmp),
                                                     fail_rank)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(deadline - time.monotonic(), 1))
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    return codes


def test_context_from_env():
    assert context_from_env({}) == DistContext()
    ctx = context_from_env({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, "cpu")
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.device, ctx.is_main) == (1, 2, "gloo", torch.device("cpu"),
                                                                               False)
    with pytest.raises(OnnxSparseError, match="--device cuda:1 names one GPU for 2 processes"):
        context_from_env({"WORLD_SIZE": "2", "RANK": "0"}, "cuda:1")
    with pytest.raises(OnnxSparseError, match="RANK 2 must be in 0..WORLD_SIZE-1"):
        context_from_env({"WORLD_SIZE": "2", "RANK": "2"}, "cpu")
    with pytest.raises(OnnxSparseError, match="must be integers"):
        context_from_env({"WORLD_SIZE": "two"}, "cpu")
    assert ctx.local_batch(64) == 32
    with pytest.raises(OnnxSparseError, match="multiple of 2"):
        ctx.local_batch(33)


def test_single_process_collectives_are_identity():
    ctx = DistContext()
    assert ctx.any(torch.tensor(True)) and not ctx.any(False) and ctx.all(True)
    assert ctx.broadcast_float(2.5) == 2.5 and ctx.mean_float(3.0) == 3.0
    assert ctx.all_gather_objects({"a": 1}) == [{"a": 1}] and ctx.broadcast_object([1]) == [1]
    module = torch.nn.Linear(2, 2)
    assert ctx.wrap(module) is module


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path):
    model_path = tmp_path / "tiny.onnx"
    onnx.save(graphs.export_torch(graphs.tiny_cnn()), model_path)
    single = prune(model_path, tmp_path / "single.onnx", _calib(), _config(), progress=False)
    run = tmp_path / "dist"
    run.mkdir()
    started = time.perf_counter()
    assert _spawn(2, run, model_path) == [0, 0]
    wall = time.perf_counter() - started
    assert sorted(p.name for p in run.iterdir() if p.suffix == ".onnx") == ["model.onnx"]  # rank 0 alone writes
    assert json.loads((run / "rank1.json").read_text()) == {"output": "None"}
    report = json.loads((run / "report.json").read_text())
    # exact sparsity, verified by onnxruntime
    assert all(row["zeros"] == row["target_zeros"] for row in report["layers"])
    pruned = onnx.load(str(run / "model.onnx"))
    assert report["achieved_sparsity"] == pytest.approx(single.achieved_sparsity, abs=1e-9)
    assert any(p.key == "onnxsparse.achieved_sparsity" for p in pruned.metadata_props)
    # the search is the same computation split over the ranks: the same scores, the same allocation
    dist_alloc, single_alloc = report["method_info"]["allocation"], single.report["method_info"]["allocation"]
    assert dist_alloc["evaluations"] == single_alloc["evaluations"]
    assert [h["best"] for h in dist_alloc["history"]] == pytest.approx([h["best"] for h in single_alloc["history"]],
                                                                       rel=1e-6)
    assert report["method_info"]["sparsities"] == pytest.approx(single.report["method_info"]["sparsities"])
    # DDP over half batches per rank: the same steps as one process, within float noise
    assert report["method_info"]["training"]["iterations"] == single.report["method_info"]["training"]["iterations"]
    cos_dist = report["verification"]["outputs"][0]["cosine"]
    cos_single = single.report["verification"]["outputs"][0]["cosine"]
    assert abs(cos_dist - cos_single) < 0.02, (cos_dist, cos_single, wall)
    assert abs(report["verification"]["top1_agreement"] - single.report["verification"]["top1_agreement"]) <= 0.1


@pytest.mark.slow
def test_failure_on_one_rank_stops_all(tmp_path):
    model_path = tmp_path / "tiny.onnx"
    onnx.save(graphs.export_torch(graphs.tiny_cnn()), model_path)
    started = time.perf_counter()
    codes = _spawn(2, tmp_path, model_path, fail_rank=1, timeout_s=120)
    assert time.perf_counter() - started < 100  # no hang: rank 0 was waiting in a collective
    assert codes == [EXIT_PEER_FAILED, 3]
    assert not (tmp_path / "error0.txt").exists()  # one message, from the rank that failed
    assert (tmp_path / "error1.txt").read_text() == "rank 1 cannot read its data"
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.slow
def test_torchrun_cli_two_processes(tmp_path):
    model_path = tmp_path / "tiny.onnx"
    onnx.save(graphs.export_torch(graphs.tiny_cnn()), model_path)
    np.save(tmp_path / "calib.npy", np.concatenate([f["input"] for f in _calib()]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "onnxsparse", "prune", str(model_path), "--sparsity", "0.7", "--calib", str(tmp_path / "calib.npy"),
           "-o", str(tmp_path / "out.onnx"), "--device", "cpu", "--batch-size", "16", "--iterations", "8",
           "--search-generations", "2", "--population", "6", "--selection-size", "32", "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("PASSED") == 1  # rank 0 alone reports
    assert (tmp_path / "out.onnx").is_file()
