"""What a deployed model costs: multiply-accumulates counted on the graph, file sizes, onnxruntime CPU latency,
and the latency-only models built from a library's config (random weights: their speed, not their accuracy).

Shared by ``benchmarks/int8.py`` and ``benchmarks/channels.py``; every number comes from the ONNX file as it
would be deployed, never from the torch student.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from benchmarks.provenance import Environment, row_provenance
from onnxsparse.exporter.save import files_size, model_files, zip_size
from onnxsparse.structured.select import observe_shapes

# Latency-only models: built from a config without any download, exported once per run.
LATENCY_MODELS = ("resnet18", "mobilenet_v3_small", "vit-tiny")
BEGIN = "<!-- BEGIN {} (generated: rerun the command instead of editing) -->"
END = "<!-- END {} -->"


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _weight_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Shapes of the constant tensors (initializers, and DequantizeLinear of one in a QDQ graph)."""
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in shapes:
            shapes[node.output[0]] = shapes[node.input[0]]
        elif node.op_type == "Constant":
            value = _attr(node, "value")
            if value is not None:
                shapes[node.output[0]] = tuple(numpy_helper.to_array(value).shape)
    return shapes


def count_macs(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> int:
    """Multiply-accumulates of one run on ``feed``: Conv, ConvTranspose, Gemm and MatMul (the QLinear and
    integer forms too), from the shapes onnxruntime observes. A per-sample figure when ``feed`` has batch 1."""
    observed = observe_shapes(model, feed)
    observed.update({k: tuple(v.shape) for k, v in feed.items()})
    constants = _weight_shapes(model)

    def shape(name: str) -> tuple[int, ...] | None:
        return observed.get(name) or constants.get(name)

    total = 0
    for node in model.graph.node:
        op = node.op_type
        out = shape(node.output[0]) if node.output else None
        if out is None:
            continue
        if op in ("Conv", "QLinearConv", "ConvInteger"):
            w = shape(node.input[3] if op == "QLinearConv" else node.input[1])
            if w is not None:
                total += int(np.prod(out)) * int(np.prod(w[1:]))
        elif op == "ConvTranspose":
            w, x = shape(node.input[1]), shape(node.input[0])
            if w is not None and x is not None:
                total += int(np.prod(x)) * int(np.prod(w[1:]))
        elif op in ("Gemm", "MatMul", "QLinearMatMul", "MatMulInteger"):
            a = shape(node.input[0])
            if a is not None:
                k = a[-1] if not (op == "Gemm" and _attr(node, "transA", 0)) else a[0]
                total += int(np.prod(out)) * int(k)
    return total


def sizes(path: Path) -> dict[str, int]:
    return {"bytes": files_size(path), "zip_bytes": zip_size(*model_files(path))}


def train_feeds(model_path: Path, calib, preprocess, seed: int, samples: int, batch: int) -> list[dict]:
    """The first ``samples`` (rounded up to a batch) of the training split ``prune`` makes of ``calib`` with
    ``seed``: what our methods fit on, handed to a peer."""
    from onnxsparse.data import load_calibration

    extra = {"preprocess": preprocess} if preprocess is not None else {}
    data = load_calibration(str(calib), onnx.load(str(model_path)), model_path=model_path, seed=seed, **extra)
    feeds, got = [], 0
    for feed in data.feeds("train", batch):
        if got >= samples:
            break
        feeds.append(feed)
        got += len(next(iter(feed.values())))
    return feeds


def build_latency_model(name: str, workdir: Path, seed: int = 0) -> tuple[Path, dict[str, np.ndarray], Path]:
    """``name`` (one of LATENCY_MODELS) exported to ONNX with a dynamic batch, a batch-1 feed, and a folder
    of 64 random calibration tensors (``.npy``) for it. Random weights: only speed and size mean anything."""
    import torch

    torch.manual_seed(seed)
    if name in ("resnet18", "mobilenet_v3_small"):
        import torchvision

        net = getattr(torchvision.models, name)(weights=None)
        shape = (1, 3, 224, 224)
    elif name == "vit-tiny":
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(image_size=224, patch_size=16, hidden_size=192, num_hidden_layers=12,
                           num_attention_heads=3, intermediate_size=768, num_labels=1000)

        class _Logits(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.vit = ViTForImageClassification(config)

            def forward(self, x):
                return self.vit(pixel_values=x).logits

        net = _Logits()
        shape = (1, 3, 224, 224)
    else:
        raise ValueError(f"unknown latency model {name!r}; known: {', '.join(LATENCY_MODELS)}")
    with torch.no_grad():  # default inits repeat tensors (zero biases, unit BatchNorm): the exporter would share
        for tensor in [*net.parameters(), *net.buffers()]:  # them, which no trained model does
            if tensor.is_floating_point():
                tensor.add_(torch.rand_like(tensor) * 1e-2 if tensor.dim() <= 1 else torch.zeros_like(tensor))
    net.eval()
    path = workdir / f"{name}.onnx"
    x = torch.randn(*shape)
    torch.onnx.export(net, (x,), str(path), input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=17,
                      dynamo=False)
    calib = workdir / f"{name}-calib"
    calib.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(64):
        np.save(calib / f"{i:03d}.npy", rng.standard_normal(shape[1:]).astype(np.float32))
    return path, {"input": x.numpy()}, calib


def update_section(path: Path, name: str, heading: str, body: str) -> None:
    """Replace the section between ``name``'s markers in ``path`` (or append it); other sections stay."""
    begin, end = BEGIN.format(name), END.format(name)
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmark results\n"
    if begin in text and end in text:
        new = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        new = text.rstrip("\n") + f"\n\n{heading}\n\n{block}\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, path)


@dataclass
class ResultsFile:
    """A JSON file of rows keyed by cell; a rerun replaces the cells it ran, the others stay."""

    path: Path

    def load(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.is_file() else {"rows": {}, "invocations": []}

    def save(self, data: dict) -> None:
        """Write ``data``, keeping the rows another process wrote to the file since it was loaded."""
        on_disk = self.load()
        data["rows"] = {**on_disk.get("rows", {}), **data["rows"]}
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        os.replace(tmp, self.path)


def add_run_arguments(parser: argparse.ArgumentParser, results: Path) -> None:
    """The latency grid, seed and results file both deployment benchmarks take."""
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=results)
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")


def open_run(args: argparse.Namespace) -> tuple[Environment, ResultsFile, dict]:
    """Logging, one torch thread, the provenance of this run and the results so far (this invocation recorded)."""
    import torch

    from benchmarks.run import machine_info

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(1)
    env = Environment.capture(1)
    store = ResultsFile(args.results)
    results = store.load()
    results["machine"] = machine_info(1)
    results.setdefault("invocations", []).append({"argv": sys.argv, "commit": env.git.commit, "dirty": env.git.dirty,
                                                  "started": _now()})
    return env, store, results


def stamp(row: dict, env: Environment, config: dict) -> dict:
    """``row`` with its provenance (commit, configuration, machine, versions) and the time it finished."""
    row.update(row_provenance(env, config))
    row["finished"] = _now()
    return row


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
