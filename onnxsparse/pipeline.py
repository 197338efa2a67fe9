"""The whole job: import -> calibration data -> method -> write back -> verify -> atomic save."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

import onnxsparse
from onnxsparse.config import PruneConfig
from onnxsparse.device import resolve_device
from onnxsparse.errors import OnnxSparseError
from onnxsparse.exporter import check_output_path, save_atomic, tensor_arrays, verify_file, write_back
from onnxsparse.graph import ImportedModel
from onnxsparse.importer import import_model
from onnxsparse.methods import MethodResult, PruneContext, get_method
from onnxsparse.sparsity.masks import zeros_for

logger = logging.getLogger(__name__)


@dataclass
class PruneResult:
    output: Path | None
    target_sparsity: float
    achieved_sparsity: float
    layers: list[dict]
    report: dict = field(default_factory=dict)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM during a run; ``phase`` says where. Nothing was written."""

    def __init__(self, phase: str) -> None:
        super().__init__(phase)
        self.phase = phase


class _Timer:
    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.current = "start"

    def phase(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                timer.current = name
                self.start = time.perf_counter()

            def __exit__(self, exc_type, exc, tb):
                timer.phases[name] = timer.phases.get(name, 0.0) + time.perf_counter() - self.start
                if exc_type is not None and issubclass(exc_type, KeyboardInterrupt) and not isinstance(exc, Interrupted):
                    raise Interrupted(name) from None

        return _Ctx()


def _layer_table(imported: ImportedModel, result: MethodResult, arrays: dict[str, np.ndarray]) -> list[dict]:
    rows = []
    for layer in imported.layers:
        target = result.sparsities.get(layer.name, 0.0)
        array = arrays.get(layer.name)
        zeros = int((array == 0).sum()) if array is not None else zeros_for(target, layer.numel)
        rows.append(
            {
                "name": layer.name,
                "node": layer.node_name,
                "op": layer.op_type,
                "shape": list(array.shape) if array is not None else list(layer.shape),
                "params": layer.numel,
                "target_sparsity": target,
                "target_zeros": zeros_for(target, layer.numel),
                "zeros": zeros,
                "achieved_sparsity": zeros / layer.numel,
            }
        )
    return rows


def _check_zeros(rows: list[dict]) -> None:
    # Zeros may exceed the target only where kept weights happen to be exactly zero; fewer is a bug.
    for row in rows:
        if row["zeros"] < row["target_zeros"]:
            raise OnnxSparseError(
                f"internal error: layer {row['name']!r} has {row['zeros']} zeros, {row['target_zeros']} allotted; "
                "nothing was written"
            )


def prune(
    model: str | os.PathLike,
    output: str | os.PathLike | None,
    calib,
    config: PruneConfig,
    *,
    preprocess=None,
    force: bool = False,
    report_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> PruneResult:
    """Prune ``model`` to ``config.sparsity`` using ``calib`` and write the verified result to ``output``.

    ``calib`` is anything :func:`onnxsparse.data.load_calibration` accepts. ``output=None`` runs everything
    but the final write (a dry run). Raises :class:`OnnxSparseError` on user errors; writes nothing then.
    """
    from onnxsparse.data import PreprocessConfig, load_calibration

    timer = _Timer()
    started = time.perf_counter()
    if output is not None:
        check_output_path(output, inputs=(model,), force=force)
    if report_path is not None:
        check_output_path(report_path, inputs=(model,), force=True)
    with timer.phase("import"):
        imported = import_model(model, exclude=config.exclude)
    if not imported.layers:
        raise OnnxSparseError(
            f"{str(model)!r} has no prunable weights (Conv, ConvTranspose, Gemm, MatMul with a constant operand)"
            + (f"; {len(imported.skipped)} skipped: " + "; ".join(f"{s.tensor}: {s.reason}" for s in imported.skipped[:5])
               if imported.skipped else "")
        )
    with timer.phase("calibration data"):
        calib_set = load_calibration(
            calib, imported.proto, model_path=model, preprocess=preprocess or PreprocessConfig(),
            max_samples=config.max_samples, holdout_size=config.holdout_size, seed=config.seed,
        )
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    student = imported.clone_module().to(device)  # keeps the importer's requires_grad flags (shared: frozen)
    teacher = imported.module.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    ctx = PruneContext(imported, teacher, student, calib_set, config, device, progress=progress)
    method = get_method(config.method)
    logger.info("method %s at sparsity %.3f on %s", config.method, config.sparsity, device)
    with timer.phase("method"):
        result = method.run(ctx)
    student = ctx.student.to("cpu").eval()
    total = sum(layer.numel for layer in imported.layers)
    metadata = {
        "onnxsparse.version": onnxsparse.__version__,
        "onnxsparse.method": config.method,
        "onnxsparse.pattern": config.pattern,
        "onnxsparse.target_sparsity": f"{config.sparsity:.6g}",
    }
    with timer.phase("export"):
        pruned, changed = write_back(imported, student, metadata)
        arrays = tensor_arrays(pruned, [layer.weight.source for layer in imported.layers])
        rows = _layer_table(imported, result, arrays)
        _check_zeros(rows)
        achieved = sum(r["zeros"] for r in rows) / total
        prop = pruned.metadata_props.add()
        prop.key, prop.value = "onnxsparse.achieved_sparsity", f"{achieved:.6g}"
    n_verify = min(config.verify_samples, calib_set.n_holdout) if calib_set.n_holdout else min(
        config.verify_samples, calib_set.n_train)
    split = "holdout" if calib_set.n_holdout else "train"

    def feeds():
        seen = 0
        for feed in calib_set.feeds(split, config.batch_size):
            if seen >= n_verify:
                return
            take = min(n_verify - seen, next(iter(feed.values())).shape[0])
            seen += take
            yield {k: v[:take] for k, v in feed.items()}

    verification = {}

    def validate(path: Path) -> None:
        nonlocal verification
        dense_ref = model if Path(model).is_file() else imported.proto
        verification = verify_file(
            path, dense_ref, feeds(), student=student, input_names=calib_set.input_names, device="cpu",
            tolerance=config.verify_tolerance,
        ).as_dict()

    with timer.phase("verify+save"):
        if output is not None:
            save_atomic(pruned, output, validate=validate)
        else:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                save_atomic(pruned, Path(tmp) / "dry-run.onnx", validate=validate)
    report = {
        "onnxsparse": onnxsparse.__version__,
        "model": str(model),
        "output": str(output) if output is not None else None,
        "method": config.method,
        "target_sparsity": config.sparsity,
        "achieved_sparsity": achieved,
        "prunable_params": total,
        "device": str(device),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "config": config.as_dict(),
        "calibration": {"train": calib_set.n_train, "holdout": calib_set.n_holdout, "pipeline": calib_set.pipeline,
                        "skipped": calib_set.skipped},
        "graph": {"opset": imported.opset, "torch_opset": imported.torch_opset, "batchnorm": imported.has_batchnorm,
                  "notes": imported.notes},
        "layers": rows,
        "skipped_layers": [vars(s) for s in imported.skipped],
        "changed_tensors": len(changed),
        "method_info": result.info,
        "verification": verification,
        "time_s": {**{k: round(v, 3) for k, v in timer.phases.items()},
                   "total": round(time.perf_counter() - started, 3)},
    }
    if report_path is not None:
        Path(report_path).write_text(json.dumps(report, indent=2, default=_json_default))
    return PruneResult(Path(output) if output is not None else None, config.sparsity, achieved, rows, report)


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (Path,)):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")
