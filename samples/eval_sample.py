#!/usr/bin/env python3
"""Top-1 accuracy of an ONNX image classifier on a PNG ImageFolder.

    python samples/eval_sample.py MODEL.onnx [--data samples/fashion_mnist/test]

The data folder has one sub-folder per class; the label of a class is its
index in sorted folder order (torchvision ImageFolder convention).

Preprocessing is a JSON object such as::

    {"scale": 0.00392, "mean": [0.286], "std": [0.353],
     "channel_order": "gray", "layout": "nchw", "input_size": [28, 28]}

meaning ``x = (pixel * scale - mean) / std`` per channel. It is taken from,
in order: ``--preprocess FILE``; the model's ``onnxsparse.preprocess``
metadata property; ``preprocess.json`` next to the data folder (its parent
directory) or inside it.

Only numpy, pillow and onnxruntime are needed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".webp"}
METADATA_KEY = "onnxsparse.preprocess"


def find_preprocess(sess: ort.InferenceSession, data_dir: Path,
                    explicit: Path | None) -> tuple[dict, str]:
    if explicit is not None:
        return json.loads(explicit.read_text()), str(explicit)
    meta = sess.get_modelmeta().custom_metadata_map
    if METADATA_KEY in meta:
        return json.loads(meta[METADATA_KEY]), f"model metadata '{METADATA_KEY}'"
    for candidate in (data_dir.parent / "preprocess.json", data_dir / "preprocess.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text()), str(candidate)
    sys.exit("error: no preprocessing found; pass --preprocess preprocess.json")


def list_image_folder(data_dir: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    if not data_dir.is_dir():
        sys.exit(f"error: data folder not found: {data_dir}")
    classes = sorted(p.name for p in data_dir.iterdir() if p.is_dir())
    if not classes:
        sys.exit(f"error: {data_dir} has no class sub-folders")
    samples = []
    for label, cls in enumerate(classes):
        for f in sorted((data_dir / cls).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                samples.append((f, label))
    if not samples:
        sys.exit(f"error: no images found under {data_dir}")
    return classes, samples


def load_image(path: Path, pre: dict) -> np.ndarray:
    """Returns one preprocessed image as float32, channels first (C,H,W)."""
    order = pre.get("channel_order", "rgb").lower()
    with Image.open(path) as im:
        im = im.convert("L" if order in ("gray", "grey", "l") else "RGB")
        size = pre.get("input_size")
        if size is not None:
            h, w = int(size[0]), int(size[1])
            if im.size != (w, h):
                im = im.resize((w, h), Image.BILINEAR)
        x = np.asarray(im, dtype=np.float32)
    x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    if order == "bgr":
        x = x[::-1]
    scale = np.float32(pre.get("scale", 1.0))
    mean = np.asarray(pre.get("mean", [0.0]), dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(pre.get("std", [1.0]), dtype=np.float32).reshape(-1, 1, 1)
    return ((x * scale - mean) / std).astype(np.float32)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Top-1 accuracy of an ONNX classifier on a PNG ImageFolder.")
    parser.add_argument("model", type=Path, help="ONNX model file")
    parser.add_argument("--data", type=Path, default=Path("samples/fashion_mnist/test"),
                        help="ImageFolder root (default: %(default)s)")
    parser.add_argument("--preprocess", type=Path, default=None,
                        help="preprocess JSON (default: model metadata, then "
                             "preprocess.json next to the data folder)")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate only the first N images (sorted order)")
    parser.add_argument("--threads", type=int, default=0,
                        help="onnxruntime intra-op threads (0 = default)")
    parser.add_argument("--json", action="store_true", help="print a JSON result line")
    args = parser.parse_args(argv)

    if not args.model.is_file():
        sys.exit(f"error: model not found: {args.model}")
    opts = ort.SessionOptions()
    if args.threads:
        opts.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(str(args.model), opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    out_name = sess.get_outputs()[0].name
    fixed_batch = isinstance(inp.shape[0], int) and inp.shape[0] > 0
    batch = inp.shape[0] if fixed_batch else args.batch_size

    pre, pre_src = find_preprocess(sess, args.data, args.preprocess)
    channels_last = str(pre.get("layout", "nchw")).lower() == "nhwc"
    classes, samples = list_image_folder(args.data)
    if args.limit is not None:
        samples = samples[:args.limit]

    t0 = time.time()
    correct = 0
    for i in range(0, len(samples), batch):
        chunk = samples[i:i + batch]
        x = np.stack([load_image(p, pre) for p, _ in chunk])
        if channels_last:
            x = x.transpose(0, 2, 3, 1)
        n = len(chunk)
        if fixed_batch and n < batch:  # pad the last batch to the fixed size
            x = np.concatenate([x, np.repeat(x[-1:], batch - n, axis=0)])
        logits = sess.run([out_name], {inp.name: np.ascontiguousarray(x)})[0][:n]
        labels = np.asarray([label for _, label in chunk])
        correct += int((logits.reshape(n, -1).argmax(1) == labels).sum())
    elapsed = time.time() - t0
    total = len(samples)
    acc = correct / total

    if args.json:
        print(json.dumps({"model": str(args.model), "data": str(args.data),
                          "images": total, "correct": correct, "top1": acc}))
    else:
        print(f"model:      {args.model}")
        print(f"data:       {args.data} ({total} images, {len(classes)} classes)")
        print(f"preprocess: {pre_src}")
        print(f"top-1 accuracy: {acc:.4f} ({correct}/{total}) in {elapsed:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
