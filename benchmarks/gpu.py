#!/usr/bin/env python3
"""UniPTS throughput on large models: ResNet-50 and ViT-B/16 at 224 through the whole ``prune`` at 0.9.

    python benchmarks/gpu.py                      # 1 GPU, then every visible GPU through torchrun
    python benchmarks/gpu.py --gpus 1             # 1 GPU only
    python benchmarks/gpu.py --small --device cpu # tiny models at 32 px on the CPU (what the test runs)

For every model (torchvision, random weights: timing only) and recipe (``paper``: the 25 x 25 search and
100 epochs, here with the gradient clip of the quick recipe, without which random weights diverge; ``quick``:
the default), the benchmark runs a shortened prune (``--generations`` search
generations, ``--iterations`` training steps) on random calibration images and measures:

* search images/s: fitness images pushed through the student per second of the allocation phase
  (candidates scored x fitness samples / seconds; the statistics correction's passes come on top);
* training images/s: global batch / seconds per training iteration;
* peak GPU memory (rank 0; none on the CPU);
* projected wall time of the paper recipe on 10,240 calibration images: 25 x 25 candidates x 10,240
  fitness images at the search rate, plus 100 epochs x 10,240 images at the training rate.

With ``--gpus 1,N`` each N > 1 runs under ``torchrun --nproc-per-node N`` (the search's evaluations and the
training's batches are split over the ranks). Prints a markdown table; ``--json`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PAPER_IMAGES = 10_240
PAPER_GENERATIONS, PAPER_POPULATION, PAPER_EPOCHS = 25, 25, 100


def build_model(name: str, small: bool) -> tuple[torch.nn.Module, int]:
    """(model with random weights, input resolution)."""
    import torchvision

    torch.manual_seed(0)
    if name == "resnet50":
        if small:  # the same bottleneck family, one block per stage, a quarter of the width
            from torchvision.models.resnet import Bottleneck, ResNet

            return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, width_per_group=16), 32
        return torchvision.models.resnet50(), 224
    if name == "vit_b_16":
        if small:
            from torchvision.models.vision_transformer import VisionTransformer

            return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                     mlp_dim=64, num_classes=10), 32
        return torchvision.models.vit_b_16(), 224
    raise SystemExit(f"unknown model {name!r}: resnet50 or vit_b_16")


def export(model: torch.nn.Module, size: int, path: Path) -> None:
    torch.onnx.export(model.eval(), torch.randn(1, 3, size, size), str(path), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                      opset_version=17, dynamo=False)


def run_one(model_path: Path, calib_path: Path, recipe: str, args, dist) -> dict:
    """One shortened prune; the measured rates and the projection (rank 0's numbers)."""
    from onnxsparse import PruneConfig, prune
    from onnxsparse.config import UniPTSConfig

    n_calib = len(np.load(calib_path, mmap_mode="r"))
    selection = max(args.batch_size, n_calib // 8)
    overrides = dict(generations=args.generations, iterations=args.iterations,
                     fitness_samples=n_calib - selection)
    if args.population is not None:  # the recipe's proportions at a smaller population
        p = args.population
        overrides.update(population=p, parents=max(2, p // 3), crossover=p // 3, mutation=p // 3)
    if recipe == "paper":
        # random weights: the paper's unclipped SGD at lr 0.01 diverged on ResNet-50 (NaN three times, lr halved
        # each time, on an H200 in fp32 and bf16; on the CPU at 64 px twice). Clipping costs one norm per step.
        overrides["max_grad_norm"] = 1.0
    unipts = UniPTSConfig.paper(**overrides) if recipe == "paper" else UniPTSConfig(**overrides)
    config = PruneConfig(sparsity=args.sparsity, device=args.device, batch_size=args.batch_size,
                         selection_size=selection, verify_size=None, unipts=unipts)
    cuda = dist.device is not None and dist.device.type == "cuda" or (
        not dist.active and args.device != "cpu" and torch.cuda.is_available())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = prune(model_path, None, str(calib_path), config, progress=False, dist=dist)
    wall = time.perf_counter() - started
    if not dist.is_main:
        return {}
    info = result.report["method_info"]
    alloc = info["allocation"]
    scored = alloc.get("evaluations", 0) + len(alloc["candidates"]) - ("search" in alloc["candidates"])
    search_rate = scored * alloc["fitness_samples"] / max(info["time_s"]["allocation"], 1e-9)
    train = info["training"]
    train_rate = train["batch_size"] / max(train["seconds_per_iteration"], 1e-9)
    search_s = PAPER_GENERATIONS * PAPER_POPULATION * PAPER_IMAGES / search_rate
    train_s = PAPER_EPOCHS * PAPER_IMAGES / train_rate
    return {
        "recipe": recipe, "processes": dist.world_size, "device": result.report["device"],
        "search_images_per_s": round(search_rate, 1), "train_images_per_s": round(train_rate, 1),
        "candidates_scored": scored, "train_iterations": train["iterations"],
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "projected_paper_hours": round((search_s + train_s) / 3600, 2),
        "projected_search_hours": round(search_s / 3600, 2), "projected_train_hours": round(train_s / 3600, 2),
        "achieved_sparsity": round(result.achieved_sparsity, 6), "wall_s": round(wall, 1),
        "phases_s": info["time_s"],  # allocation, start (reconstruction), training, finish: where the time went
        "top1_agreement": result.report["verification"].get("top1_agreement"),
    }


def prepare(name: str, args, workdir: Path) -> tuple[Path, Path]:
    model, size = build_model(name, args.small)
    model_path = workdir / f"{name}.onnx"
    export(model, size, model_path)
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((args.calib_images, 3, size, size)).astype(np.float32)
    calib_path = workdir / f"{name}-calib.npy"
    np.save(calib_path, calib)
    return model_path, calib_path


def worker(args) -> int:
    """One rank (under torchrun) or the single process: run the recipes on one prepared model."""
    from onnxsparse.distributed import context_from_env, session

    dist = context_from_env(os.environ, args.device)
    rows = []
    with session(dist):
        for recipe in args.recipes.split(","):
            row = run_one(Path(args.model_path), Path(args.calib_path), recipe, args, dist)
            if row:
                rows.append({"model": args.model_name, **row})
    if dist.is_main and args.out:
        Path(args.out).write_text(json.dumps(rows))
    return 0


def markdown(rows: list[dict]) -> str:
    cols = ["model", "recipe", "processes", "device", "search_images_per_s", "train_images_per_s", "peak_gpu_gib",
            "projected_paper_hours", "projected_search_hours", "projected_train_hours", "wall_s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("-" if r.get(c) is None else str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet50,vit_b_16")
    parser.add_argument("--recipes", default="paper,quick")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    parser.add_argument("--gpus", default=None, help="process counts, e.g. 1,8 (default: 1 and every visible GPU)")
    parser.add_argument("--calib-images", type=int, default=None, help="default 1024 (--small: 48)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 64 (--small: 8)")
    parser.add_argument("--generations", type=int, default=None, help="search generations measured (default 2, "
                                                                      "--small: 1)")
    parser.add_argument("--population", type=int, default=None, help="default: the recipe's (--small: 6)")
    parser.add_argument("--iterations", type=int, default=None, help="training steps measured (default 30; "
                                                                     "--small: 3)")
    parser.add_argument("--small", action="store_true", help="tiny models at 32 px (a CPU smoke run)")
    parser.add_argument("--json", dest="json_path", default=None, help="write the rows here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-name", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    parser.add_argument("--calib-path", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    small = args.small
    args.calib_images = args.calib_images or (48 if small else 1024)
    args.batch_size = args.batch_size or (8 if small else 64)
    args.generations = args.generations or (1 if small else 2)
    args.iterations = args.iterations or (3 if small else 30)
    if small and args.population is None:
        args.population = 6
    if args.worker:
        return worker(args)
    on_cuda = args.device != "cpu" and torch.cuda.is_available()
    counts = [int(c) for c in args.gpus.split(",")] if args.gpus else sorted(
        {1, torch.cuda.device_count()} if on_cuda else {1})
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for name in args.models.split(","):
            model_path, calib_path = prepare(name, args, workdir)
            for n in counts:
                out = workdir / f"{name}-{n}.json"
                passthrough = ["--worker", "--model-name", name, "--model-path", str(model_path), "--calib-path",
                               str(calib_path), "--out", str(out), "--recipes", args.recipes,
                               "--sparsity", str(args.sparsity), "--device", args.device,
                               "--calib-images", str(args.calib_images), "--batch-size", str(args.batch_size),
                               "--generations", str(args.generations), "--iterations", str(args.iterations)]
                if args.population is not None:
                    passthrough += ["--population", str(args.population)]
                if small:
                    passthrough.append("--small")
                if n == 1:
                    worker(parser.parse_args(passthrough))
                else:
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(n), str(Path(__file__).resolve()), *passthrough]
                    subprocess.run(cmd, check=True)
                rows += json.loads(out.read_text())
    print(markdown(rows))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
