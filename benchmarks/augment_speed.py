#!/usr/bin/env python3
"""Training augmentation throughput: ``onnxsparse.data.augment_batch`` against ``torchvision.transforms.v2``.

    python benchmarks/augment_speed.py [--threads 1] [--device cpu]

Random resized crop (scale 0.35..1, ratio 3/4..4/3, bilinear) + horizontal flip on float32 batches of
64x1x28x28 and 64x3x224x224, every sample with its own crop, seeded. torchvision's v2 transforms draw one
crop per call from the global RNG, so per-sample crops take a loop over the batch (seeded through
``torch.random.fork_rng``); its one-crop-per-batch call is timed too, for reference only (it is not the
same augmentation). Each result is checked to repeat exactly for the same seed. Prints CPU (or CUDA wall)
milliseconds per batch, best of three rounds; CPU time is steadier than wall time on a shared machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torchvision.transforms import v2

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxsparse.data import augment_batch  # noqa: E402
from onnxsparse.data.augment import CROP_RATIO, CROP_SCALE, FLIP_P  # noqa: E402

SHAPES = ((64, 1, 28, 28), (64, 3, 224, 224))


def _v2_transform(height: int, width: int) -> v2.Compose:
    return v2.Compose([
        v2.RandomResizedCrop((height, width), scale=CROP_SCALE, ratio=CROP_RATIO, antialias=False),
        v2.RandomHorizontalFlip(FLIP_P),
    ])


def v2_per_sample(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    transform = _v2_transform(*x.shape[-2:])
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        return torch.stack([transform(image) for image in x])


def v2_one_crop_per_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    transform = _v2_transform(*x.shape[-2:])
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        return transform(x)


CANDIDATES = {
    "onnxsparse augment_batch (per sample)": augment_batch,
    "torchvision v2, loop (per sample)": v2_per_sample,
    "torchvision v2, one crop per batch": v2_one_crop_per_batch,
}


def seconds_per_batch(fn, x: torch.Tensor, reps: int) -> float:
    clock = time.perf_counter if x.is_cuda else time.process_time
    generator = torch.Generator().manual_seed(1)
    fn(x, generator)
    best = float("inf")
    for _ in range(3):
        if x.is_cuda:
            torch.cuda.synchronize()
        start = clock()
        for _ in range(reps):
            fn(x, generator)
        if x.is_cuda:
            torch.cuda.synchronize()
        best = min(best, (clock() - start) / reps)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print("| batch | method | ms per batch | images/s |\n|---|---|---:|---:|")
    for shape in SHAPES:
        x = torch.randn(shape, device=device)
        for name, fn in CANDIDATES.items():
            first = fn(x, torch.Generator().manual_seed(0))
            if not torch.equal(first, fn(x, torch.Generator().manual_seed(0))):
                raise SystemExit(f"{name} does not repeat for the same seed")
            seconds = seconds_per_batch(fn, x, reps=50 if shape[-1] < 64 else 5)
            print(f"| {'x'.join(map(str, shape))} | {name} | {1000 * seconds:.2f} | {shape[0] / seconds:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
