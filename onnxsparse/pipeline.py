"""The whole job: import -> calibration data -> method -> write back -> verify -> atomic save."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

import onnxsparse
from onnxsparse.checkpoint import RunDir
from onnxsparse.config import PruneConfig
from onnxsparse.data import PreprocessConfig, load_calibration
from onnxsparse.data.calibration_set import CalibrationSet, feed_batches
from onnxsparse.device import determinism, out_of_memory, resolve_device
from onnxsparse.distributed import DistContext
from onnxsparse.errors import OnnxSparseError, QualityGateFailed
from onnxsparse.exporter import check_output_path, save_atomic, tensor_arrays, verify_file, write_back
from onnxsparse.exporter.save import EXTERNAL_DATA_THRESHOLD, files_size, model_files, staged_data_path, zip_size
from onnxsparse.exporter.shrink import shrink
from onnxsparse.exporter.verify import export_fidelity, file_agreement
from onnxsparse.exporter.writeback import external_bytes, set_metadata, to_sparse_initializers
from onnxsparse.graph import ImportedModel
from onnxsparse.importer import import_model
from onnxsparse.methods import MethodResult, PruneContext, get_method
from onnxsparse.methods.unipts.candidate import Candidate, materialise
from onnxsparse.metrics import wilson_interval
from onnxsparse.plain import json_default
from onnxsparse.quantize import Closeness, choose_int8
from onnxsparse.sparsity import patterns
from onnxsparse.sparsity.masks import zeros_for
from onnxsparse.structured.distill import Regrowth, distill
from onnxsparse.structured.method import ChannelSelection, apply_to_student, select_channels
from onnxsparse.timing import Interrupted, Phases  # noqa: F401 - Interrupted: public here since 0.1

logger = logging.getLogger(__name__)

MIN_MEANINGFUL_VERIFY = 50  # verification samples under which the gate's figure is flagged as uncertain
FALLBACK_VERIFY_SAMPLES = 256  # training samples the gate reads when there is no verification split
# Training samples that calibrate int8 activation ranges (the selection split chooses the int8 settings)
QUANTIZE_SAMPLES = 256


@dataclass
class PruneResult:
    output: Path | None
    target_sparsity: float
    achieved_sparsity: float
    layers: list[dict]
    report: dict = field(default_factory=dict)


def _layer_table(imported: ImportedModel, result: MethodResult, arrays: dict[str, np.ndarray],
                 nm: tuple[int, int] | None) -> list[dict]:
    """One row per prunable layer. With an N:M pattern the target is ``1 - N/M`` (0 for layers left dense)."""
    dense = patterns.dense_layers(imported.layers, nm)
    rows = []
    for layer in imported.layers:
        if nm is None:
            target, pattern = result.sparsities.get(layer.name, 0.0), "unstructured"
        elif layer.name in dense:
            target, pattern = 0.0, "dense"
        else:
            target, pattern = 1.0 - nm[0] / nm[1], patterns.format_pattern(nm)
        array = arrays.get(layer.name)
        zeros = int((array == 0).sum()) if array is not None else zeros_for(target, layer.numel)
        axis = patterns.layer_onnx_axis(layer)
        tightest = patterns.tightest_pattern(array, axis) if array is not None else None
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
                "pattern": pattern,
                "nm_axis": axis,  # group axis of the ONNX initializer (TensorRT: input channels)
                "nm": patterns.format_pattern(tightest) if tightest else "-",
                "dense_reason": dense.get(layer.name),
            }
        )
    return rows


def _check_zeros(rows: list[dict], imported: ImportedModel, arrays: dict[str, np.ndarray],
                 nm: tuple[int, int] | None, *, rounded: bool = False) -> None:
    """``rounded``: ``arrays`` are int8 weights (minus zero point), where rounding may zero small weights of
    layers left dense too."""
    # Zeros may exceed the target only where kept weights happen to be exactly zero; fewer is a bug.
    for row in rows:
        if row["zeros"] < row["target_zeros"]:
            raise OnnxSparseError(
                f"internal error: layer {row['name']!r} has {row['zeros']} zeros, {row['target_zeros']} allotted; "
                "nothing was written"
            )
    if nm is None:
        return
    n, m = nm
    for row in rows:
        array = arrays.get(row["name"])
        if array is None:
            continue
        if row["pattern"] == "dense":
            if rounded:
                continue
            source = imported.layer(row["name"]).weight.source  # zeros map to zeros in every layout
            before = int((tensor_arrays(imported.proto, [source], imported.base_dir)[source.name] == 0).sum())
            if row["zeros"] > before:
                raise OnnxSparseError(
                    f"internal error: layer {row['name']!r} must stay dense under pattern {n}:{m} "
                    f"({row['dense_reason']}) but has {row['zeros']} zeros, {before} before; nothing was written"
                )
        elif not patterns.check_nm(array, n, m, row["nm_axis"]):
            raise OnnxSparseError(
                f"internal error: layer {row['name']!r} breaks the {n}:{m} pattern along ONNX axis {row['nm_axis']}; "
                "nothing was written"
            )


def _storage(model_path: Path | None, pruned: onnx.ModelProto, sparse: onnx.ModelProto, save_format: str,
             converted: list[str]) -> dict:
    """File sizes of the pruned model in both formats, and of a zip (deflate) archive of each."""
    input_bytes = files_size(model_path) if model_path is not None and model_path.is_file() else None
    variants = {}
    for name, proto in (("dense", pruned), ("sparse-initializer", sparse)):
        outside = external_bytes(proto)  # tensors written to the external data file
        size = proto.ByteSize() + outside
        variants[name] = {
            "bytes": size,
            # zipping in memory doubles the model's footprint: only below the single-file limit
            "zip_bytes": (zip_size(proto.SerializeToString())
                          if size < EXTERNAL_DATA_THRESHOLD // 4 and not outside else None),
        }
    return {
        "format": save_format,
        "sparse_tensors": len(converted) if save_format == "sparse-initializer" else 0,
        "sparse_tensors_possible": len(converted),
        "input_bytes": input_bytes,
        "input_zip_bytes": (zip_size(*model_files(model_path))
                            if input_bytes is not None and input_bytes < EXTERNAL_DATA_THRESHOLD // 4 else None),
        **variants,
        "saved_bytes": None,
    }


def prune(
    model: str | os.PathLike | onnx.ModelProto,
    output: str | os.PathLike | None,
    calib,
    config: PruneConfig,
    *,
    preprocess=None,
    force: bool = False,
    report_path: str | os.PathLike | None = None,
    progress: bool = True,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    dist: DistContext | None = None,
) -> PruneResult:
    """Prune ``model`` to ``config.sparsity`` using ``calib`` and write the verified result to ``output``.

    ``calib`` is anything :func:`onnxsparse.data.load_calibration` accepts. ``output=None`` runs everything
    but the final write (a dry run). Raises :class:`OnnxSparseError` on user errors; writes nothing then.
    ``dist`` (from :mod:`onnxsparse.distributed`) runs this as one rank of a torchrun job: the method's work is
    shared, rank 0 alone exports, verifies and writes; the other ranks return a result without ``output``.
    """
    timer = Phases(interrupts=True)
    started = time.perf_counter()
    model_path = None if isinstance(model, onnx.ModelProto) else Path(model)
    sources = (model_path,) if model_path is not None else ()
    if output is not None:
        check_output_path(output, inputs=sources, force=force)
    if report_path is not None:
        check_output_path(report_path, inputs=sources, force=True)
    dist = dist or DistContext()
    ctx, calib_set = _prepare(model, model_path, calib, config, preprocess, timer, dist, progress, run_dir, resume)
    if config.quantize is not None and ctx.imported.base_dir is not None:
        raise OnnxSparseError(f"--quantize {config.quantize} does not support models stored with external data "
                              "(over 2 GB); prune without --quantize")
    with timer("calibration data"):
        signals = ctx.output_signals()  # what each output is: loss, fitness, correction choice and gate read it
    notes = _pattern_notes(config)
    logger.info("method %s at sparsity %.3f on %s", config.method, config.sparsity, ctx.device)
    if config.pattern == "channel":
        return _prune_channels(ctx, model_path, calib_set, output, signals, notes, timer, started, dist, report_path)
    with timer("method"), determinism(config.deterministic, ctx.device):
        try:
            # Nothing to prune: no method runs, so every tensor of the input is written back unchanged
            # (training or statistics correction would otherwise move weights at sparsity 0).
            result = (_unchanged(ctx.imported) if config.sparsity == 0 and config.nm is None
                      else get_method(config.method).run(ctx))
        except torch.cuda.OutOfMemoryError as exc:
            raise out_of_memory(exc, ctx.device, config) from None
    dist.broadcast_module(ctx.student)  # rank 0's weights on every rank, whatever float noise did
    if not dist.is_main:
        return PruneResult(None, config.sparsity, float("nan"), [], {"rank": dist.rank})
    run = _Run(ctx.imported, ctx.student.to("cpu").eval(), calib_set, config, ctx.device, model_path, output,
               result, signals, notes, timer, started)
    dry_dir = tempfile.TemporaryDirectory() if output is None else None
    save_path = Path(output) if output is not None else Path(dry_dir.name) / "dry-run.onnx"
    # External data is streamed beside the output while written back, never held in memory.
    staged = staged_data_path(save_path) if run.imported.base_dir is not None else None
    # The teacher's weights stay alive through the change-detection snapshots until write-back is done.
    del ctx
    try:
        return _export_verify_save(run, staged, save_path, report_path)
    finally:
        if staged is not None:
            with contextlib.suppress(OSError):
                staged.unlink()
        if dry_dir is not None:
            dry_dir.cleanup()


def _prune_channels(ctx: PruneContext, model_path: Path | None, calib_set: CalibrationSet, output, signals,
                    notes: list[str], timer: Phases, started: float, dist: DistContext, report_path) -> PruneResult:
    """``--pattern channel``: select on the ONNX graph, mask the student, shrink the ModelProto, then the gate."""

    if dist.active:
        raise OnnxSparseError("--pattern channel runs in one process; run it without torchrun")
    imported, config = ctx.imported, ctx.config
    with timer("method"):
        proto = imported.proto
        if imported.base_dir is not None:
            proto = onnx.ModelProto()
            proto.CopyFrom(imported.proto)
            onnx.external_data_helper.load_external_data_for_model(proto, str(imported.base_dir))
        excluded = {t.source.name for t in imported.tracked if t.role == "weight"} - {
            layer.weight.source.name for layer in imported.layers}
        selection = select_channels(proto, ctx.calib, config, editable={l.weight.source.name for l in imported.layers},
                                    writable={t.source.name for t in imported.tracked if not t.shared},
                                    excluded=excluded)
        apply_to_student(selection, imported.tracked, ctx.student)
        if config.method == "unipts":  # distillation from the refitted start, removed channels held out
            budget = config.unipts.time_budget
            spent = selection.info.get("search", {}).get("seconds", 0.0)
            regrow = config.unipts.channel_regrow
            selection.info["distillation"] = distill(ctx, selection,
                                                     budget=None if budget is None else max(1.0, budget - spent),
                                                     regrowth=Regrowth(regrow) if regrow is not None else None)
    result = MethodResult({}, {}, selection.info)
    run = _Run(imported, ctx.student.to("cpu").eval(), calib_set, config, ctx.device, model_path, output, result,
               signals, notes, timer, started)
    del ctx
    dry_dir = tempfile.TemporaryDirectory() if output is None else None
    save_path = Path(output) if output is not None else Path(dry_dir.name) / "dry-run.onnx"
    try:
        return _export_verify_save(run, None, save_path, report_path, channels=_Channels(selection))
    finally:
        if dry_dir is not None:
            dry_dir.cleanup()


@dataclass
class _Channels:
    """``--pattern channel``: the selection the written-back model is shrunk by, and the figures of the shrink."""

    selection: ChannelSelection
    params_before: int = 0
    params_after: int = 0

    def shrink(self, pruned: onnx.ModelProto) -> tuple[onnx.ModelProto, float]:
        """The model without its removed channels, and the fraction of MACs removed (in its metadata)."""
        self.params_before = _parameter_count(pruned)
        pruned = shrink(pruned, self.selection.analysis, self.selection.plan.removed)
        self.params_after = _parameter_count(pruned)
        set_metadata(pruned, "onnxsparse.macs_removed", f"{self.macs_removed:.6g}")
        return pruned, self.macs_removed

    @property
    def macs_removed(self) -> float:
        macs_before, macs_after = self.selection.macs()
        return 1.0 - macs_after / macs_before if macs_before else 0.0

    def report(self, storage: dict) -> dict:
        selection = self.selection
        macs_before, macs_after = selection.macs()
        return {
            "macs_before": macs_before, "macs_after": macs_after, "macs_removed": self.macs_removed,
            "params_before": self.params_before, "params_after": self.params_after,
            "bytes_before": storage.get("input_bytes"), "bytes_after": storage.get("saved_bytes"),
            "groups": selection.analysis.report(), "kept": {str(k): v for k, v in selection.kept.items()},
            "whole": [{"group": g.index, "channels": g.channels, "producers": list(g.producers), "reason": g.reason,
                       "stopped_by": g.stopped_by} for g in selection.analysis.whole()],
        }


def _parameter_count(model: onnx.ModelProto) -> int:
    """Elements of the initializers and Constant-node tensors."""
    tensors = list(model.graph.initializer) + [a.t for n in model.graph.node if n.op_type == "Constant"
                                                for a in n.attribute if a.name == "value"]
    return sum(int(np.prod(t.dims)) for t in tensors)


def _prepare(model, model_path: Path | None, calib, config: PruneConfig, preprocess, timer: Phases,
             dist: DistContext, progress: bool, run_dir, resume: bool) -> tuple[PruneContext, CalibrationSet]:
    """Import, calibration data, device, teacher and student, run directory: what a method gets, and the whole
    calibration set (the verification split is the gate's alone)."""

    with timer("import"):
        imported = import_model(model, exclude=config.exclude)
    if not imported.layers:
        raise OnnxSparseError(
            f"{str(model)!r} has no prunable weights (Conv, ConvTranspose, Gemm, MatMul with a constant operand)"
            + (f"; {len(imported.skipped)} skipped: " + "; ".join(f"{s.tensor}: {s.reason}" for s in imported.skipped[:5])
               if imported.skipped else "")
        )
    with timer("calibration data"):
        calib_set = load_calibration(
            calib, imported.proto, model_path=model_path, preprocess=preprocess or PreprocessConfig(),
            max_samples=config.max_samples, selection_size=config.selection_size, verify_size=config.verify_size,
            seed=config.seed,
        )
    _check_distributed(dist, config, run_dir, resume)
    device = dist.device if dist.active else resolve_device(config.device)
    torch.manual_seed(config.seed)
    student = imported.clone_module().to(device)  # keeps the importer's requires_grad flags (shared: frozen)
    teacher = imported.module.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    runs = None
    if run_dir is not None:
        runs = RunDir(run_dir, _fingerprint(model_path, imported, calib, config, preprocess), resume=resume)
    elif resume:
        raise OnnxSparseError("resume needs a run directory")
    # Methods are handed no verification samples: the gate's figure is measured on samples no decision saw.
    ctx = PruneContext(imported, teacher, student, calib_set.without_verification(), config, device,
                       progress=progress and dist.is_main, run_dir=runs, dist=dist)
    return ctx, calib_set


def _pattern_notes(config: PruneConfig) -> list[str]:
    notes: list[str] = []
    if config.nm is not None:
        n, m = config.nm
        if abs(config.sparsity - (1.0 - n / m)) > 1e-9:
            notes.append(f"--sparsity {config.sparsity:g} ignored: pattern {config.pattern} sets every N:M layer to "
                         f"{1.0 - n / m:g} (layers it cannot group stay dense)")
            logger.warning(notes[-1])
    return notes


@dataclass
class _Run:
    """What export, verification and the report need from a finished method run (rank 0)."""

    imported: ImportedModel
    student: torch.nn.Module  # pruned, on the CPU, eval mode
    calib: object  # CalibrationSet
    config: PruneConfig
    device: torch.device
    model_path: Path | None
    output: str | os.PathLike | None
    result: MethodResult
    signals: object  # methods.signals.Signals
    notes: list[str]
    timer: Phases
    started: float
    quantize_report: dict | None = None  # set when --quantize ran

    @property
    def total(self) -> int:
        return sum(layer.numel for layer in self.imported.layers)

    def metadata(self) -> dict[str, str]:
        return {
            "onnxsparse.version": onnxsparse.__version__,
            "onnxsparse.method": self.config.method,
            "onnxsparse.pattern": self.config.pattern,
            "onnxsparse.target_sparsity": f"{self.config.sparsity:.6g}",
            **({"onnxsparse.quantize": self.config.quantize} if self.config.quantize else {}),
        }

    @property
    def verify_split(self) -> str:
        """The split the gate reads: verification, which no decision saw; the training split only when the
        calibration data left none (the report and stderr then say the gate's figure is not independent)."""
        return "verification" if self.calib.n_verification else "train"

    @property
    def dense_source(self):
        return self.model_path if self.model_path is not None else self.imported.proto

    def split_feeds(self, split: str, n: int | None = None):
        arrays = getattr(self.calib, split)
        return feed_batches({name: a[:n] for name, a in arrays.items()}, self.calib.dtypes, self.config.batch_size)

    def verify_feeds(self):
        return self.split_feeds(self.verify_split,
                                self.calib.n_verification or min(self.calib.n_train, FALLBACK_VERIFY_SAMPLES))

    def quantize_feeds(self) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
        """Calibration feeds (the first ``QUANTIZE_SAMPLES`` training samples) and selection feeds (the selection
        split; the calibration feeds when there is none). The verification split stays the gate's."""
        calibrate = list(self.split_feeds("train", QUANTIZE_SAMPLES))
        return calibrate, list(self.split_feeds("selection")) if self.calib.n_selection else calibrate


class _Gate:
    """Verification of the saved file, then the quality gate: below ``--min-agreement`` the save is refused.

    An int8 file is compared with the dense model as onnxruntime deploys it (every optimisation, on the CPU);
    its float form was compared with the torch student before quantization (:func:`_quantize`)."""

    def __init__(self, run: _Run, int8: bool = False):
        self.run = run
        self.int8 = int8
        self.verification: dict = {}
        self.report: dict = {"min_agreement": run.config.min_agreement, "split": run.verify_split}
        warning = _gate_warning(run.verify_split, run.calib.n_verification)
        if warning:
            self.report["warning"] = warning
            run.notes.append(warning)
            logger.warning(warning)

    def __call__(self, path: Path) -> None:
        run = self.run
        checked = verify_file(
            path, run.dense_source, run.verify_feeds(),
            student=None if self.int8 else run.student, input_names=run.calib.input_names, device="cpu",
            tolerance=run.config.verify_tolerance, ort_device="cpu" if self.int8 else run.device,
            exact=not self.int8,
        )
        if self.int8:
            checked.export_max_rel_error = run.quantize_report["export_max_rel_error"]
        self.verification = checked.as_dict()
        passed = checked.agreement is None or checked.agreement >= run.config.min_agreement
        self.report.update({"agreement": checked.agreement, "measure": checked.measure, "passed": passed,
                            "samples": checked.samples,
                            "interval_95": (wilson_interval(checked.agreement, checked.samples)
                                            if checked.agreement is not None else None)})
        if run.calib.n_selection and run.verify_split == "verification":
            # beside the gate's figure, for reading it: the same measure on the split the choices were made on
            self.report["selection_agreement"] = file_agreement(
                path, run.dense_source, run.split_feeds("selection"), ort_device="cpu" if self.int8 else run.device,
                exact=not self.int8).agreement
        if not passed:
            raise QualityGateFailed(checked.agreement, run.config.min_agreement, checked.measure, checked.samples)


def _gate_warning(split: str, n: int) -> str | None:
    if split != "verification":
        return ("the calibration data left no verification split: the quality gate measures on training samples, "
                "which the method fitted; its figure is optimistic (give more calibration samples or --verify-size)")
    if n < MIN_MEANINGFUL_VERIFY:
        return (f"the verification split has {n} samples (fewer than {MIN_MEANINGFUL_VERIFY}): the quality gate's "
                "figure is uncertain, see quality_gate.interval_95 (give more calibration samples or --verify-size)")
    return None


@dataclass
class _Export:
    """The written-back float model of one final weight set, and what its zeros are checked on."""

    name: str  # "plain", or the name of a MethodResult alternative
    state: dict[str, torch.Tensor] | None  # the student's state for it (None: the student as the method left it)
    pruned: onnx.ModelProto
    changed: list[str]
    arrays: dict[str, np.ndarray]
    rows: list[dict]
    macs_removed: float | None = None  # --pattern channel


def _export(run: _Run, staged: Path | None, name: str, state, channels: _Channels | None) -> _Export:
    """Write back the student (for channels, the shrunk model); its layer table comes after the dense copy is
    released (:func:`_tabulate`): reading the written weights beside it would hold both in memory."""
    pruned, changed = write_back(run.imported, run.student, run.metadata(), data_file=staged)
    if channels is not None:  # whole channels are removed, not zeroed: no layer table
        pruned, macs_removed = channels.shrink(pruned)
        return _Export(name, state, pruned, changed, {}, [], macs_removed)
    return _Export(name, state, pruned, changed, {}, [])


def _tabulate(run: _Run, export: _Export, staged: Path | None) -> None:
    """The export's layer table, with every zero checked on the written tensors."""
    if export.macs_removed is not None:
        return
    imported, config = run.imported, run.config
    export.arrays = tensor_arrays(export.pruned, [layer.weight.source for layer in imported.layers],
                                  staged.parent if staged is not None else None)
    export.rows = _layer_table(imported, run.result, export.arrays, config.nm)
    _check_zeros(export.rows, imported, export.arrays, config.nm)


def _export_verify_save(run: _Run, staged: Path | None, save_path: Path, report_path,
                        channels: _Channels | None = None) -> PruneResult:
    """Write back (and shrink, for ``--pattern channel``), quantize with ``--quantize``, verify and save; the caller
    removes the staged external data if anything fails."""
    imported, config = run.imported, run.config
    with run.timer("export"):
        exports = [_export(run, staged, "plain", None, channels)]
        alternatives = run.result.alternatives if config.quantize is not None else {}
        if alternatives:  # the quantize stage chooses between them: each written back while the dense copy lives
            plain = Candidate.capture(run.student, "plain")
            exports[0].state = plain.state
            for name, state in alternatives.items():
                materialise(Candidate(name, state), run.student)
                exports.append(_export(run, staged, name, state, channels))
            materialise(plain, run.student)
        # Written back: the dense torch copy and the masks are no longer needed (the file holds the result).
        imported.release_dense()
        run.result.masks.clear()
        for export in exports:
            _tabulate(run, export, staged)
    int8_names = None
    chosen = exports[0]
    pruned, rows = chosen.pruned, chosen.rows
    if config.quantize is not None:
        with run.timer("quantize"):
            chosen, pruned, rows, int8_names = _quantize(run, exports, channels is not None)
    with run.timer("export"):
        if channels is not None:
            achieved = chosen.macs_removed
            storage = _storage(run.model_path, pruned, pruned, "dense", [])
            to_save = pruned
        else:
            achieved = sum(r["zeros"] for r in rows) / run.total
            set_metadata(pruned, "onnxsparse.achieved_sparsity", f"{achieved:.6g}")
            to_save, storage = _storage_format(run, pruned, int8_names)
    gate = _Gate(run, int8=int8_names is not None)
    failed: QualityGateFailed | None = None
    with run.timer("verify+save"):
        try:
            save_atomic(to_save, save_path, validate=gate, staged_data=staged)
            storage["saved_bytes"] = files_size(save_path)
        except QualityGateFailed as exc:
            failed = exc  # nothing is written; the report still is: it says why
    report = _report(run, rows, achieved, storage, chosen.changed, gate, written=failed is None)
    if channels is not None:
        report["channels"] = channels.report(storage)
    if report_path is not None:
        Path(report_path).write_text(json.dumps(report, indent=2, default=json_default))
    if failed is not None:
        failed.report = report
        raise failed
    return PruneResult(Path(run.output) if run.output is not None else None, config.sparsity, achieved, rows, report)


def _storage_format(run: _Run, pruned: onnx.ModelProto,
                    int8_names: dict[str, str] | None = None) -> tuple[onnx.ModelProto, dict]:
    """The model to save in the chosen ``--save-format``, and the storage figures of both formats.
    ``int8_names``: float weight name -> the int8 initializer that replaced it."""
    config = run.config
    int8_names = int8_names or {}
    initializer_weights = [int8_names.get(layer.weight.source.name, layer.weight.source.name)
                           for layer in run.imported.layers if layer.weight.source.kind == "initializer"]
    sparse_model, converted = to_sparse_initializers(pruned, initializer_weights)
    storage = _storage(run.model_path, pruned, sparse_model, config.save_format, converted)
    if config.save_format == "sparse-initializer" and not converted:
        run.notes.append("--save-format sparse-initializer: no pruned weight is smaller as a sparse tensor "
                         "(int64 indices cost 8 bytes per kept weight: it pays off above ~2/3 sparsity); saved dense")
    return (sparse_model if config.save_format == "sparse-initializer" else pruned), storage


def _quantize(run: _Run, exports: list[_Export],
              channels: bool) -> tuple[_Export, onnx.ModelProto, list[dict], dict[str, str] | None]:
    """``--quantize int8``: the weight set kept, the model to save, its layer rows counted on the stored integers,
    and which int8 initializer replaced each float weight (None when the float model is kept, the report says why).

    With several weight sets (UniPTS's fake-quant-trained student beside the plain one), each is quantized as it
    would be alone and the one whose final model is closer to the dense model on the selection split is kept (the
    plain one on a tie); the student is left holding it."""

    imported, config = run.imported, run.config
    calibrate, select = run.quantize_feeds()
    dense = run.model_path if run.model_path is not None else imported.proto
    choices, fidelities = {}, {}
    for export in exports:
        if export.state is not None:
            materialise(Candidate(export.name, export.state), run.student)
        # The int8 file does not compute what the torch student computes: the float model it is made from is
        # checked against the student now, as the saved file is without --quantize.
        fidelities[export.name] = export_fidelity(export.pruned, run.verify_feeds(), run.student,
                                                  run.calib.input_names, config.verify_tolerance)
        choices[export.name] = choose_int8(export.pruned, dense, calibrate, select)
    scores = {name: Closeness(**choice.report["final_closeness"]) for name, choice in choices.items()}
    chosen = max(exports, key=lambda e: (scores[e.name], e.name == "plain"))
    if chosen.state is not None:
        materialise(Candidate(chosen.name, chosen.state), run.student)
    choice = choices[chosen.name]
    run.quantize_report = {"format": config.quantize, "export_max_rel_error": fidelities[chosen.name],
                           **choice.report}
    if len(exports) > 1:
        kept = {"kept": chosen.name,
                "rule": "the weight set whose final model (int8 where applied) is closer to the dense model on the "
                        "selection split (lowest per-output agreement, then mean R^2; the plain one on a tie)",
                "scores": {name: {**score.as_dict(), "int8": choices[name].applied}
                           for name, score in scores.items()}}
        run.quantize_report["weight_sets"] = kept
        run.result.info["weight_set"] = kept
        logger.info("int8: kept the %s weight set (selection %s)", chosen.name,
                    ", ".join(f"{k} {v.agreement:.4f}" for k, v in scores.items()))
    if not choice.applied:
        run.notes.append(f"--quantize {config.quantize}: {choice.report.get('reason')}"
                         + (f"; {len(choice.stored)} weight(s) stored int8 and computed in float" if choice.stored
                            else ""))
        logger.warning(run.notes[-1])
    if not choice.weights:
        return chosen, chosen.pruned, chosen.rows, None
    kept_float = sorted({k["node"] for k in choice.report["kept_float"]})
    logger.info("int8: %d weights int8 (%d of them computed in float), %d nodes kept in float (%s)",
                len(choice.weights), len(choice.stored), len(kept_float), ", ".join(kept_float) or "none")
    half = choice.report.get("float16_storage") or {}
    if half.get("candidates"):
        logger.info("int8: float16 storage: %s", half.get("reason"))
    int8_names = {name: w.initializer for name, w in choice.weights.items()}
    if channels:  # no zeros to count: whole channels were removed (check_int8_weights proved the int8 weights)
        return chosen, choice.model, chosen.rows, int8_names
    present = {init.name for init in choice.model.graph.initializer}
    final: dict[str, np.ndarray] = {}
    for layer in imported.layers:
        name = layer.weight.source.name
        weight = choice.weights.get(name)
        if weight is not None:
            final[name] = weight.centred()
        elif name in present or layer.weight.source.kind != "initializer":
            final[name] = chosen.arrays[name]
        else:
            raise OnnxSparseError(f"weight {name!r} was quantized in a way whose zeros cannot be checked "
                                  f"(not an int8 input of its node); nothing was written")
    int8_rows = _layer_table(imported, run.result, final, config.nm)
    _check_zeros(int8_rows, imported, final, config.nm, rounded=True)
    return chosen, choice.model, int8_rows, int8_names


def _report(run: _Run, rows: list[dict], achieved: float, storage: dict, changed: list[str], gate: _Gate,
            written: bool) -> dict:
    imported, config, device, calib = run.imported, run.config, run.device, run.calib
    return {
        "onnxsparse": onnxsparse.__version__,
        "model": str(run.model_path) if run.model_path is not None else "<ModelProto>",
        "output": str(run.output) if run.output is not None and written else None,
        "method": config.method,
        "pattern": config.pattern,
        "target_sparsity": config.sparsity,
        "achieved_sparsity": achieved,
        "prunable_params": run.total,
        "device": str(device),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "config": config.as_dict(),
        "calibration": {"train": calib.n_train, "selection": calib.n_selection,
                        "verification": calib.n_verification, "pipeline": calib.pipeline,
                        "skipped": calib.skipped},
        "graph": {"opset": imported.opset, "torch_opset": imported.torch_opset, "batchnorm": imported.has_batchnorm,
                  "notes": imported.notes},
        "layers": rows,
        "skipped_layers": [vars(s) for s in imported.skipped],
        "dense_layers": [{"name": r["name"], "node": r["node"], "op": r["op"], "reason": r["dense_reason"]}
                         for r in rows if r["pattern"] == "dense"],
        "storage": storage,
        "notes": run.notes,
        "changed_tensors": len(changed),
        "method_info": run.result.info,
        "verification": gate.verification,
        "signals": run.signals.as_list(),
        "quality_gate": gate.report,
        "quantize": run.quantize_report,
        "time_s": {**run.timer.rounded(), "total": round(time.perf_counter() - run.started, 3)},
    }


def _check_distributed(dist: DistContext, config: PruneConfig, run_dir, resume: bool) -> None:
    if config.method == "unipts":
        dist.local_batch(config.batch_size)  # refused before the search rather than after it
    if dist.active and (run_dir is not None or resume):
        raise OnnxSparseError(
            f"--run-dir/--resume are not supported with {dist.world_size} processes (checkpoints are written "
            "by one process); run without them, or in one process"
        )


def _unchanged(imported: ImportedModel) -> MethodResult:
    masks = {layer.name: torch.ones(layer.shape, dtype=torch.bool) for layer in imported.layers}
    return MethodResult({layer.name: 0.0 for layer in imported.layers}, masks,
                        {"skipped": "sparsity 0: nothing to prune, every tensor is left as it was"})


def _fingerprint(model_path: Path | None, imported: ImportedModel, calib, config: PruneConfig, preprocess) -> dict:
    """What must match for a run directory to be resumed: model bytes, options, calibration source."""
    digest = hashlib.sha256()
    if model_path is not None:
        with open(model_path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    else:
        digest.update(imported.proto.SerializeToString())
    source = str(Path(calib).resolve()) if isinstance(calib, (str, os.PathLike)) else type(calib).__name__
    return {"model_sha256": digest.hexdigest(), "config": config.as_dict(), "calibration": source,
            "preprocess": repr(preprocess)}
