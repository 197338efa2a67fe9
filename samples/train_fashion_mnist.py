#!/usr/bin/env python3
"""Build the bundled Fashion-MNIST sample used by the README quick start.

The script trains a small ResNet-style CNN on Fashion-MNIST (CPU only,
deterministic for a fixed seed) and writes, under ``--out``
(default ``samples/fashion_mnist``):

* ``model.onnx``      - eval-mode export, BatchNorm folded into Conv;
* ``model_bn.onnx``   - same weights, BatchNormalization nodes kept;
* ``calib/NNNNN.png`` - 1,024 unlabeled calibration images (training split);
* ``test/<NN_class>/NNNNN.png`` - the 10,000 test images (ImageFolder layout);
* ``labels.txt``      - test folder names in label order;
* ``preprocess.json`` - preprocessing expected by both models;
* ``README.md``       - provenance and dense accuracy of both ONNX files.

The data is read from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``).

Usage::

    python samples/train_fashion_mnist.py [--epochs N] [--out DIR]
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import struct
import sys
import time
import warnings
from pathlib import Path

import numpy as np

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
DATA_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
CLASS_NAMES = [
    "t-shirt_top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
]
FOLDER_NAMES = [f"{i:02d}_{name}" for i, name in enumerate(CLASS_NAMES)]

MEAN = 0.2860
STD = 0.3530
PREPROCESS = {
    "scale": 1.0 / 255.0,
    "mean": [MEAN],
    "std": [STD],
    "channel_order": "gray",
    "layout": "nchw",
    "input_size": [28, 28],
}
DESCRIPTION = (
    "Small ResNet-style CNN trained on Fashion-MNIST (10 classes). "
    "Input 'input': float32 (N,1,28,28), grayscale pixel/255 normalized with "
    f"mean {MEAN} and std {STD}. Output 'logits': float32 (N,10), class order: "
    + ", ".join(CLASS_NAMES) + ". Bundled sample of onnxsparse."
)

NUM_CALIB = 1024
OPSET = 17


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    """Read a gzip-compressed IDX file (unsigned byte data) into a numpy array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated IDX file")
    return arr.reshape(shape).copy()  # writable, owns its memory


def load_fashion_mnist(data_dir: Path = DATA_DIR) -> dict[str, np.ndarray]:
    missing = [n for n in DATA_FILES.values() if not (data_dir / n).is_file()]
    if missing:
        sys.exit(
            f"error: Fashion-MNIST not found in {data_dir} (missing: "
            f"{', '.join(missing)}).\n"
            "Install it with: apt-get install dataset-fashion-mnist"
        )
    out = {key: read_idx(data_dir / name) for key, name in DATA_FILES.items()}
    assert out["train_images"].shape == (60000, 28, 28)
    assert out["test_images"].shape == (10000, 28, 28)
    return out


def normalize(x01):
    """x01: pixel/255 values; returns the model input."""
    return (x01 - MEAN) / STD


# --------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------
def build_model(widths=(32, 64, 128), stem=24):
    import torch.nn as nn

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.shortcut = None
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False),
                    nn.BatchNorm2d(cout),
                )

        def forward(self, x):
            identity = x if self.shortcut is None else self.shortcut(x)
            y = self.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return self.relu(y + identity)

    class FashionResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(1, stem, 3, 1, 1, bias=False),
                nn.BatchNorm2d(stem),
                nn.ReLU(inplace=True),
            )
            blocks, cin = [], stem
            for w in widths:  # each stage halves the resolution: 28->14->7->4
                blocks.append(BasicBlock(cin, w, 2))
                cin = w
            self.stages = nn.Sequential(*blocks)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(cin, len(CLASS_NAMES))

        def forward(self, x):
            x = self.stages(self.stem(x))
            return self.fc(self.pool(x).flatten(1))

    return FashionResNet()


# --------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------
def augment(x01, gen):
    """Random crop (padding 2) + horizontal flip, vectorized over the batch."""
    import torch
    import torch.nn.functional as F

    n = x01.shape[0]
    padded = F.pad(x01, (2, 2, 2, 2))  # zero pixels, like the image background
    oy = torch.randint(0, 5, (n,), generator=gen)
    ox = torch.randint(0, 5, (n,), generator=gen)
    ar = torch.arange(28)
    rows = (oy[:, None] + ar)[:, :, None]  # (n,28,1)
    cols = (ox[:, None] + ar)[:, None, :]  # (n,1,28)
    out = padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)
    flip = torch.rand(n, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def evaluate_torch(model, images_u8, labels, batch_size=1000):
    import torch

    model.eval()
    logits = []
    with torch.no_grad():
        for i in range(0, len(images_u8), batch_size):
            xb = torch.from_numpy(images_u8[i:i + batch_size]).float().div_(255.0)
            logits.append(model(normalize(xb[:, None])))
    logits = torch.cat(logits).numpy()
    return float((logits.argmax(1) == labels).mean()), logits


def train(model, data, epochs, batch_size, lr, weight_decay, seed, log=print):
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed + 1)
    x_train = torch.from_numpy(data["train_images"])[:, None]  # uint8
    y_train = torch.from_numpy(data["train_labels"].astype(np.int64))
    n = x_train.shape[0]
    steps_per_epoch = n // batch_size  # drop the last incomplete batch
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, momentum=0.9, nesterov=True,
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch,
        pct_start=0.25, div_factor=10.0, final_div_factor=100.0,
    )
    model = model.to(memory_format=torch.channels_last)
    for epoch in range(epochs):
        model.train()
        t0 = time.time()
        perm = torch.randperm(n, generator=gen)
        total_loss, correct, seen = 0.0, 0, 0
        for s in range(steps_per_epoch):
            idx = perm[s * batch_size:(s + 1) * batch_size]
            xb = augment(x_train[idx].float().div_(255.0), gen)
            xb = normalize(xb).contiguous(memory_format=torch.channels_last)
            yb = y_train[idx]
            out = model(xb)
            loss = F.cross_entropy(out, yb, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(idx)
            correct += int((out.argmax(1) == yb).sum())
            seen += len(idx)
        test_acc, _ = evaluate_torch(model, data["test_images"], data["test_labels"])
        log(f"epoch {epoch + 1}/{epochs}: loss {total_loss / seen:.4f} "
            f"train acc {correct / seen:.4f} test acc {test_acc:.4f} "
            f"({time.time() - t0:.1f}s)")
    return model.to(memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------
def inline_identity_initializers(model) -> int:
    """Replace ``Identity(initializer)`` nodes by a copy of the initializer.

    The exporter de-duplicates initializers with equal values; in a residual
    block the bias of ``bn2`` and of the shortcut BN receive identical
    gradients (their outputs are summed), so they stay equal and one of them
    would otherwise be produced by an Identity node instead of being a plain
    initializer.
    """
    import onnx

    inits = {t.name: t for t in model.graph.initializer}
    keep, replaced = [], 0
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(inits[node.input[0]])
            tensor.name = node.output[0]
            model.graph.initializer.append(tensor)
            replaced += 1
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return replaced


def finalize_onnx(path: Path) -> None:
    """Clean up the exported graph and add the preprocessing metadata."""
    import onnx

    model = onnx.load(str(path))
    inline_identity_initializers(model)
    meta = {
        "onnxsparse.preprocess": json.dumps(PREPROCESS),
        "onnxsparse.labels": json.dumps(CLASS_NAMES),
        "description": DESCRIPTION,
    }
    keep = [p for p in model.metadata_props if p.key not in meta]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    model.doc_string = DESCRIPTION
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def export_onnx(model, out_dir: Path) -> tuple[Path, Path]:
    import onnx
    import torch

    model.eval()
    dummy = torch.zeros(1, 1, 28, 28)
    common = dict(
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=OPSET, dynamo=False,
    )
    folded = out_dir / "model.onnx"
    with_bn = out_dir / "model_bn.onnx"
    with warnings.catch_warnings():
        # the legacy exporter is used on purpose (deprecated since torch 2.9)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (dummy,), str(folded), **common)
        # PRESERVE keeps the module's (eval) mode and skips the eval-only
        # Conv+BN fusion; no constant folding so the BN nodes survive as-is.
        torch.onnx.export(
            model, (dummy,), str(with_bn),
            training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
            **common,
        )
    for path in (folded, with_bn):
        finalize_onnx(path)

    def count_bn(path):
        graph = onnx.load(str(path)).graph
        return sum(node.op_type == "BatchNormalization" for node in graph.node)

    if count_bn(folded) != 0:
        raise RuntimeError(f"{folded}: BatchNormalization was not folded")
    if count_bn(with_bn) == 0:
        raise RuntimeError(f"{with_bn}: expected BatchNormalization nodes")
    for path in (folded, with_bn):
        if any(n.op_type == "Identity" for n in onnx.load(str(path)).graph.node):
            raise RuntimeError(f"{path}: unexpected Identity node")
    for node in onnx.load(str(with_bn)).graph.node:
        if node.op_type == "BatchNormalization":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("training_mode", 0) != 0 or len(node.output) != 1:
                raise RuntimeError(f"{with_bn}: BatchNormalization in training form")
    return folded, with_bn


# --------------------------------------------------------------------------
# PNG export + evaluation from the PNGs
# --------------------------------------------------------------------------
def save_png(array_u8: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(array_u8, mode="L").save(path, format="PNG", optimize=True)


def write_images(data, out_dir: Path, seed: int) -> None:
    calib_dir = out_dir / "calib"
    test_dir = out_dir / "test"
    for d in (calib_dir, test_dir):
        if d.exists():
            shutil.rmtree(d)
    calib_dir.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    calib_idx = rng.choice(len(data["train_images"]), NUM_CALIB, replace=False)
    for i, idx in enumerate(calib_idx):
        save_png(data["train_images"][idx], calib_dir / f"{i:05d}.png")
    for name in FOLDER_NAMES:
        (test_dir / name).mkdir(parents=True)
    for i, (img, label) in enumerate(zip(data["test_images"], data["test_labels"])):
        save_png(img, test_dir / FOLDER_NAMES[label] / f"{i:05d}.png")
    (out_dir / "labels.txt").write_text("\n".join(FOLDER_NAMES) + "\n")
    (out_dir / "preprocess.json").write_text(json.dumps(PREPROCESS, indent=2) + "\n")


def load_png_folder(test_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read the ImageFolder test set back from disk (class = sorted folder index)."""
    from PIL import Image

    classes = sorted(p.name for p in test_dir.iterdir() if p.is_dir())
    images, labels = [], []
    for label, cls in enumerate(classes):
        for f in sorted((test_dir / cls).glob("*.png")):
            with Image.open(f) as im:
                images.append(np.asarray(im.convert("L"), dtype=np.uint8))
            labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def run_onnx(path: Path, images_u8: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = normalize(images_u8.astype(np.float32) * np.float32(1.0 / 255.0))
    x = x.astype(np.float32)[:, None]
    outs = [sess.run(["logits"], {"input": x[i:i + batch_size]})[0]
            for i in range(0, len(x), batch_size)]
    return np.concatenate(outs)


# --------------------------------------------------------------------------
# README
# --------------------------------------------------------------------------
def write_readme(out_dir: Path, info: dict) -> None:
    a = info["acc"]
    text = f"""# Fashion-MNIST sample

Bundled sample for the onnxsparse quick start: a small ResNet-style CNN
trained on [Fashion-MNIST](https://github.com/zalandoresearch/fashion-mnist)
(10 classes of 28x28 grayscale clothing images), exported to ONNX, plus
calibration and test images stored as PNG files.

Generated by `samples/train_fashion_mnist.py` (do not edit by hand); rebuild with

    python samples/train_fashion_mnist.py --epochs {info['epochs']}

(requires `apt-get install dataset-fashion-mnist`, torch, onnx, onnxruntime,
pillow, numpy).

## Contents

| path | what |
|------|------|
| `model.onnx` | eval-mode export, BatchNorm folded into Conv (no `BatchNormalization` nodes) |
| `model_bn.onnx` | the same weights with {info['num_bn']} `BatchNormalization` nodes kept (inference form) |
| `calib/NNNNN.png` | {NUM_CALIB} unlabeled calibration images, a seeded random subset (without replacement) of the training split |
| `test/NN_class/NNNNN.png` | all 10,000 test-split images, ImageFolder layout (`NNNNN` = index in the original test file) |
| `labels.txt` | test folder names, one per line, in label order (= sorted order) |
| `preprocess.json` | preprocessing expected by both models |

Both ONNX files (opset {OPSET}, legacy TorchScript exporter) have input
`input` float32 `(N,1,28,28)` and output `logits` float32 `(N,10)`; the batch
axis is dynamic. They carry the metadata properties `onnxsparse.preprocess`
(same JSON as `preprocess.json`), `onnxsparse.labels` and `description`.

Preprocessing: load as grayscale, `x = (pixel / 255 - {MEAN}) / {STD}`, NCHW.

## Model

{info['arch']}; {info['params']:,} parameters.
Trained for {info['epochs']} epochs with SGD (Nesterov momentum 0.9, weight decay
{info['weight_decay']}), one-cycle learning rate (peak {info['lr']}), batch size
{info['batch_size']}, label smoothing 0.1, and augmentation by random crop with
2-pixel zero padding plus horizontal flip; seed {info['seed']}, CPU only,
`torch.set_num_threads(2)` (torch {info['torch']}).

## Dense accuracy

Top-1 accuracy on the 10,000 test images, read back from the PNG files:

| model | runtime | top-1 |
|-------|---------|-------|
| PyTorch (eval mode) | torch | {a['torch']:.4f} |
| `model.onnx` | onnxruntime {info['ort']} | {a['model.onnx']:.4f} |
| `model_bn.onnx` | onnxruntime {info['ort']} | {a['model_bn.onnx']:.4f} |

Check with:

    onnxsparse eval samples/fashion_mnist/model.onnx --data samples/fashion_mnist/test --labels samples/fashion_mnist/labels.txt
"""
    (out_dir / "README.md").write_text(text)


# --------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("samples/fashion_mnist"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    args = parser.parse_args(argv)

    data = load_fashion_mnist()  # fail early, before importing torch

    import onnxruntime as ort
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.use_deterministic_algorithms(True)

    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)

    model = build_model()
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params:,} parameters")

    t0 = time.time()
    model = train(model, data, args.epochs, args.batch_size, args.lr,
                  args.weight_decay, args.seed)
    train_time = time.time() - t0
    print(f"training wall time: {train_time:.1f}s")
    model.eval()

    folded, with_bn = export_onnx(model, out_dir)
    print(f"exported {folded} and {with_bn}")

    print("writing PNG images ...")
    write_images(data, out_dir, args.seed)

    images, labels = load_png_folder(out_dir / "test")
    assert len(images) == 10000
    acc_torch, logits_torch = evaluate_torch(model, images, labels)
    acc = {"torch": acc_torch}
    for path in (folded, with_bn):
        logits = run_onnx(path, images)
        diff = float(np.abs(logits - logits_torch).max())
        acc[path.name] = float((logits.argmax(1) == labels).mean())
        print(f"{path.name}: onnxruntime top-1 {acc[path.name]:.4f} "
              f"(max |logits - torch| = {diff:.2e})")
        if diff > 1e-4:
            raise RuntimeError(f"{path}: onnxruntime output differs from torch by {diff}")
    print(f"torch (eval) top-1 on the PNG test set: {acc_torch:.4f}")

    import onnx
    num_bn = sum(n.op_type == "BatchNormalization" for n in onnx.load(str(with_bn)).graph.node)
    write_readme(out_dir, {
        "acc": acc, "epochs": args.epochs, "params": params, "seed": args.seed,
        "lr": args.lr, "batch_size": args.batch_size,
        "weight_decay": args.weight_decay, "num_bn": num_bn,
        "torch": torch.__version__.split("+")[0], "ort": ort.__version__,
        "arch": ("conv stem (24 ch, 3x3) + three residual BasicBlocks "
                 "(32/64/128 ch, each stride 2: 28->14->7->4) with BatchNorm and "
                 "ReLU, global average pool, Linear(128, 10)"),
    })
    print(f"wrote {out_dir}/README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
