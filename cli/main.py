"""``onnxsparse`` command line: a thin layer over the library. User errors print one line, no traceback."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys

# torch's CPU build uses GNU OpenMP, whose idle threads spin: next to any other CPU-bound job that collapses
# throughput (measured 27x slower on 2 shared cores). Must be set before torch is imported; users may override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click

import onnxsparse
from onnxsparse.config import METHODS, QUANTIZE_FORMATS, SAVE_FORMATS
from onnxsparse.errors import OnnxSparseError, QualityGateFailed
from onnxsparse_cli.options import ExpertOption, help_all, preprocessing, verbosity


_JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
_BATCH_SIZE = click.option("--batch-size", type=int, default=64, show_default=True)


def _onnxruntime_options(func):
    """--json, --device, the preprocessing options and verbosity: what eval and compare share."""
    device = click.option(
        "--device", default="cpu", show_default=True,
        help="onnxruntime provider: cpu, cuda[:N] (needs onnxruntime-gpu, see README; CPU if missing) or auto.",
    )
    return _JSON(device(preprocessing(verbosity(func))))


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except QualityGateFailed as exc:
            click.echo(f"onnxsparse: {exc}", err=True)
            click.echo(f"FAILED: agreement {exc.agreement:.2%} < --min-agreement {exc.threshold:.2%}")
            sys.exit(3)
        except OnnxSparseError as exc:
            click.echo(f"onnxsparse: error: {exc}", err=True)
            click.echo("FAILED", err=True)
            sys.exit(2)
        except KeyboardInterrupt as exc:
            phase = getattr(exc, "phase", None)
            where = f" during {phase}" if phase else ""
            written = getattr(exc, "written", None)
            if written is not None:  # the signal came after the atomic rename: the file there is complete
                click.echo(f"onnxsparse: interrupted{where}; {written} was already written (complete)", err=True)
            else:
                click.echo(f"onnxsparse: interrupted{where}; no output was written", err=True)
                click.echo("FAILED", err=True)
            sys.exit(130)


def _signals_as_interrupt() -> None:
    """Ctrl-C (SIGINT) and SIGTERM stop a run (atomic writes leave no partial file either way).

    SIGINT is installed too, not left to Python: Python only installs its own SIGINT handler when the process
    starts with SIGINT at its default, and a background job of a non-interactive shell (``cmd &`` in a script,
    many supervisors and CI runners) starts with SIGINT ignored, so ``kill -INT`` did nothing and the run went
    on to write its model."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    with contextlib.suppress(ValueError):  # not in the main thread (e.g. embedded): keep the default
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "terminal_width": 110,
                                           "max_content_width": 110})
@click.version_option(onnxsparse.__version__, prog_name="onnxsparse")
def main() -> None:
    """Post-training sparsity for ONNX models (UniPTS), verified with onnxruntime."""
    _signals_as_interrupt()


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--sparsity", type=float, required=True, help="Target fraction of prunable weights set to zero, in [0, 1).")
@click.option("--calib", required=True, type=click.Path(), help="Calibration data: image folder, .npy folder, .npy/.npz file.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Output model path.")
@click.option("--dry-run", is_flag=True, help="Run and verify everything but write no model.")
@click.option("--method", type=click.Choice(list(METHODS)), default="unipts", show_default=True)
@click.option("--pattern", default="unstructured", show_default=True,
              help="unstructured, N:M (2:4: the 2 largest of every 4 input-channel weights), or channel (whole "
                   "channels removed; --sparsity: the fraction of MACs).")
@click.option("--channel-multiple", cls=ExpertOption, type=int, default=16, show_default=True,
              help="--pattern channel: kept channels of a group rounded to a multiple of this (where the group's "
                   "size is one); onnxruntime's CPU convolutions are fastest on multiples of 16 (AVX-512) or 8.")
@click.option("--save-format", cls=ExpertOption, type=click.Choice(list(SAVE_FORMATS)), default="dense", show_default=True,
              help="sparse-initializer: pruned weights as ONNX sparse tensors where that is smaller "
                   "(onnxruntime densifies them at load).")
@click.option("--quantize", type=click.Choice(list(QUANTIZE_FORMATS)), default=None,
              help="int8: quantize the sparse model (zeros stay zero); what is slower in int8 stays float.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--deterministic", cls=ExpertOption, is_flag=True,
              help="CUDA: deterministic algorithms, TF32 and bf16 off, so that the same command gives the same bytes "
                   "(slower). The CPU gives the same bytes without it.")
@click.option("--exclude", cls=ExpertOption, multiple=True, help="Skip layers whose node name, op type or weight name matches (glob).")
@click.option("--no-correction", cls=ExpertOption, is_flag=True, help="No BatchNorm re-estimation / per-channel correction.")
@click.option("--batch-size", cls=ExpertOption, type=int, default=64, show_default=True)
@click.option("--max-samples", cls=ExpertOption, type=int, default=None, help="Use at most this many calibration samples.")
@click.option("--selection-size", cls=ExpertOption, type=int, default=None,
              help="Calibration samples kept aside for the method's choices (default: 10%, 32..1000).")
@click.option("--verify-size", cls=ExpertOption, type=int, default=None,
              help="Calibration samples kept aside for the quality gate alone (default: 10%, 32..1000).")
@click.option("--augment/--no-augment", "augment", cls=ExpertOption, default=None,
              help="Random crops (and flips, where the dense model is mirror-invariant) in UniPTS distillation "
                   "[default: off; on with --recipe paper].")
@click.option("--recipe", cls=ExpertOption, type=click.Choice(["quick", "paper"]), default="quick", show_default=True,
              help="UniPTS budget preset: quick, or the paper's 25x25 search and 100 epochs.")
@click.option("--epochs", cls=ExpertOption, type=float, default=None,
              help="UniPTS: distillation epochs over the calibration set (quick recipe: what its work plan fits, "
                   "at most 80, counted from the model's size and the sample count).")
@click.option("--iterations", cls=ExpertOption, type=int, default=None, help="UniPTS: training iterations (overrides --epochs).")
@click.option("--search-generations", cls=ExpertOption, type=int, default=None, help="UniPTS: allocation-search generations.")
@click.option("--population", cls=ExpertOption, type=int, default=None, help="UniPTS: allocation-search population.")
@click.option("--no-search", cls=ExpertOption, is_flag=True, help="UniPTS: skip the allocation search (keeps the fitter of the uniform and global-magnitude allocations).")
@click.option("--lr", cls=ExpertOption, type=float, default=None, help="UniPTS: SGD learning rate (default 0.05; 0.01 with --recipe paper).")
@click.option("--feature-weight", cls=ExpertOption, type=float, default=None,
              help="UniPTS: weight of the layer-output distillation term beside the outputs' (default 1; 0 with "
                   "--recipe paper, and 0 turns it off).")
@click.option("--fake-quant-fraction", cls=ExpertOption, type=float, default=None,
              help="UniPTS with --quantize int8: a second student replays this fraction of the training iterations "
                   "with fake int8 weights and activations; the closer int8 model on the selection is kept "
                   "(default 0.1; 0: none).")
@click.option("--channel-regrow", cls=ExpertOption, type=float, default=None,
              help="UniPTS with --pattern channel: channels may regrow during distillation; this fraction of each "
                   "group's kept channels is swapped at the first of 4 points, decaying (default: masks fixed).")
@click.option("--time-budget", cls=ExpertOption, type=float, default=None,
              help="UniPTS: optional cap, in seconds, on search + training (default: none; the work plan decides). "
                   "A run it cuts is reported as cut and is not reproducible.")
@click.option("--correction-samples", cls=ExpertOption, type=int, default=256, show_default=True,
              help="Calibration samples used to fit the per-channel correction (one batch).")
@click.option("--verify-tolerance", cls=ExpertOption, type=float, default=1e-3, show_default=True,
              help="Largest relative error allowed between onnxruntime and the pruned torch model.")
@click.option("--min-agreement", type=float, default=0.8, show_default=True,
              help="Quality gate: below this agreement with the dense model on samples no decision saw, nothing is "
                   "written (exit 3); 0: off.")
@click.option("--run-dir", cls=ExpertOption, type=click.Path(file_okay=False), default=None,
              help="Keep checkpoints here (after the search, every --checkpoint-every epochs of training).")
@click.option("--resume", "resume_dir", cls=ExpertOption, type=click.Path(file_okay=False), default=None,
              help="Continue the run kept in this run directory (same model, data and options).")
@click.option("--checkpoint-every", cls=ExpertOption, type=int, default=5, show_default=True, help="Epochs between checkpoints.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None, help="Write a JSON report here.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@preprocessing(expert=True)
@verbosity
@help_all
def prune(model, calib, output, dry_run, device, run_dir, resume_dir, report_path, force, preprocess, quiet,
          **options) -> None:
    """Prune MODEL to --sparsity using unlabelled --calib data; write the verified result to -o."""
    from onnxsparse.distributed import context_from_env

    dist = context_from_env(os.environ, device)  # torchrun's variables; one process without them
    try:
        config = _prune_config(output, dry_run, device, **options)
    except OnnxSparseError:
        if not dist.is_main:  # every rank reads the same options: rank 0 alone reports their error
            raise SystemExit(2) from None
        raise
    writes = output is not None and not dry_run
    before = _file_identity(output) if writes else None
    try:
        _run_prune(dist, model, output, dry_run, calib, config, preprocess, force, report_path, quiet,
                   run_dir, resume_dir)
        # done and said so: a signal from here to the exit must not turn the run into "no output was written"
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not in the main thread: nothing was installed there either
                signal.signal(signum, signal.SIG_IGN)
    except KeyboardInterrupt as exc:
        # a signal after the output's atomic rename cannot undo it: say so instead of "no output was written"
        if writes and _file_identity(output) not in (None, before):
            exc.written = output
        raise


def _file_identity(path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _prune_config(output, dry_run, device, *, sparsity, method, pattern, save_format, quantize, seed, deterministic,
                  exclude, no_correction, batch_size, max_samples, selection_size, verify_size, recipe, epochs,
                  iterations, search_generations, population, no_search, lr, time_budget, correction_samples,
                  verify_tolerance, min_agreement, checkpoint_every, augment, feature_weight, channel_multiple,
                  fake_quant_fraction, channel_regrow):
    from onnxsparse.config import PruneConfig, UniPTSConfig

    if output is None and not dry_run:
        raise OnnxSparseError("-o/--output is required (or pass --dry-run)")
    overrides = {k: v for k, v in {
        "epochs": epochs, "iterations": iterations, "generations": search_generations,
        "lr": lr, "time_budget": time_budget, "augment": augment,
        "feature_weight": feature_weight, "fake_quant_fraction": fake_quant_fraction,
        "channel_regrow": channel_regrow,
    }.items() if v is not None}
    if time_budget == 0:
        overrides["time_budget"] = None
    if no_search:
        overrides["search"] = False
    unipts = UniPTSConfig.paper(**overrides) if recipe == "paper" else UniPTSConfig(**overrides)
    if population is not None:
        unipts = unipts.with_population(population)
    return PruneConfig(
        sparsity=sparsity, method=method, pattern=pattern, seed=seed, device=device, deterministic=deterministic,
        exclude=tuple(exclude),
        correction=not no_correction, batch_size=batch_size, max_samples=max_samples, selection_size=selection_size,
        verify_size=verify_size,
        save_format=save_format, quantize=quantize, correction_samples=correction_samples,
        verify_tolerance=verify_tolerance, min_agreement=min_agreement, checkpoint_every=checkpoint_every,
        channel_multiple=channel_multiple, unipts=unipts,
    )


def _run_prune(dist, model, output, dry_run, calib, config, preprocess, force, report_path, quiet,
               run_dir, resume_dir) -> None:
    from onnxsparse.distributed import session
    from onnxsparse.pipeline import prune as run_prune

    if run_dir is not None and resume_dir is not None and run_dir != resume_dir:
        raise OnnxSparseError(f"--run-dir {run_dir} and --resume {resume_dir} name different folders; give one")
    with session(dist):
        result = run_prune(model, None if dry_run else output, calib, config, preprocess=preprocess, force=force,
                           report_path=report_path, progress=not quiet, run_dir=resume_dir or run_dir,
                           resume=resume_dir is not None, dist=dist)
    if not dist.is_main:  # rank 0 writes and reports
        return
    if report_path is not None:
        from onnxsparse.report_plot import plot_path, write_report_plot

        write_report_plot(result.report, plot_path(report_path))
    if not quiet:
        _print_summary(result.report)
    channels = result.report.get("channels")
    done = (f"{result.achieved_sparsity:.2%} of the MACs removed ({channels['macs_before']:,} -> "
            f"{channels['macs_after']:,}; parameters {channels['params_before']:,} -> {channels['params_after']:,})"
            if channels else
            f"{result.achieved_sparsity:.2%} of {result.report['prunable_params']:,} prunable weights are zero")
    click.echo(f"PASSED: {done}" + (f", written to {output}" if output and not dry_run else " (dry run, nothing written)"))


def _print_summary(report: dict) -> None:
    rows = report["layers"]
    click.echo(f"{'layer':<40} {'op':<14} {'params':>10} {'target':>8} {'achieved':>9} {'N:M':>5}", err=True)
    for row in rows:
        name = row["node"] or row["name"]
        click.echo(
            f"{name[-40:]:<40} {row['op']:<14} {row['params']:>10,} {row['target_sparsity']:>8.2%} "
            f"{row['achieved_sparsity']:>9.2%} {row.get('nm', '-'):>5}",
            err=True,
        )
    for skipped in report["skipped_layers"]:
        click.echo(f"skipped {skipped['node_name'] or skipped['tensor']} ({skipped['op_type']}): {skipped['reason']}", err=True)
    for dense in report.get("dense_layers", []):
        click.echo(f"left dense {dense['node'] or dense['name']} ({dense['op']}): {dense['reason']}", err=True)
    for group in report.get("channels", {}).get("whole", []):
        click.echo(f"channels left whole: {', '.join(group['producers']) or group['group']} ({group['channels']}): "
                   f"{group['reason']} [{group['stopped_by']}]", err=True)
    for note in report.get("notes", []):
        click.echo(f"note: {note}", err=True)
    storage = report.get("storage")
    if storage:
        def _mb(n):
            if n is None:
                return "?"
            return f"{n / 1e6:.3g} MB" if n >= 1e6 else f"{n / 1e3:.3g} kB"

        parts = [f"{fmt} {_mb(storage[fmt]['bytes'])} (zip {_mb(storage[fmt]['zip_bytes'])})"
                 for fmt in ("dense", "sparse-initializer")]
        click.echo(f"storage: input {_mb(storage.get('input_bytes'))} (zip {_mb(storage.get('input_zip_bytes'))}); "
                   + "; ".join(parts)
                   + f"; saved as {storage['format']}: {_mb(storage.get('saved_bytes'))}", err=True)
    quant = report.get("quantize")
    if quant:
        lat = quant.get("latency", {})
        if quant.get("applied"):
            click.echo(f"int8: {quant['int8_weights']} weights int8 ({quant['calibration']['chosen']} calibration, "
                       f"{quant['op_types']['chosen']} op types"
                       f"{', bias-corrected' if (quant.get('bias_correction') or {}).get('applied') else ''}); "
                       f"{lat.get('final_ms', 0):.3f} ms against "
                       f"{lat.get('float_ms', 0):.3f} ms float (batch 1, 1 thread)", err=True)
        else:
            click.echo(f"int8: not applied: {quant.get('reason')}", err=True)
        storage_entry = quant.get("weight_storage") or {}
        if storage_entry.get("candidates"):
            click.echo(f"int8 storage (computed in float): {storage_entry.get('reason')}", err=True)
        half_entry = quant.get("float16_storage") or {}
        if half_entry.get("candidates"):
            click.echo(f"float16 storage: {half_entry.get('reason')}", err=True)
        for kept in quant.get("kept_float", []):
            click.echo(f"kept float {kept['node']} ({kept['op']}, {kept['for']}): {kept['reason']}", err=True)
    info = report.get("method_info", {})
    for key, what in (("correction", "statistics correction"), ("final_correction", "statistics correction")):
        choice = info.get(key)
        if isinstance(choice, dict) and choice.get("scores"):
            scores = ", ".join(f"{mode} {score:.4g}" for mode, score in choice["scores"].items())
            click.echo(f"{what}: {choice['chosen']} (agreement score on the {choice['measured_on']}: {scores})", err=True)
    if info.get("kept"):
        click.echo(f"unipts: started from {info['start']['chosen']}, kept the {info['kept']} model", err=True)
    ver = report.get("verification", {})
    agreement = ver.get("agreement")
    outs = ver.get("outputs", [])
    gate = report.get("quality_gate", {})
    line = f"verified on {ver.get('samples', 0)} {gate.get('split', 'verification')} samples with onnxruntime:"
    if agreement is not None:
        line += f" agreement with dense {agreement:.2%} ({ver.get('measure')});"
    if outs:
        line += f" cosine {outs[0]['cosine']:.4f};"
    line += f" export error {ver.get('export_max_rel_error', 0):.2g}"
    click.echo(line, err=True)
    times = report.get("time_s", {})
    click.echo("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()) + f" on {report['device']}", err=True)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@_JSON
@verbosity
def inspect(model, as_json, quiet) -> None:
    """Per-layer weight shapes, parameter counts, current sparsity and N:M pattern of MODEL.

    N:M is the tightest of 1:8, 1:4, 2:8, 2:4, 4:8 the weight satisfies along its input-channel axis
    (TensorRT's layout); "2:4" says whether 2:4 sparse kernels can use the layer as it is.
    """
    from onnxsparse.inspect import inspect_model

    rows = inspect_model(model)
    total = sum(r.params for r in rows)
    zeros = sum(r.zeros for r in rows)
    if as_json:
        click.echo(json.dumps({"layers": [r.as_dict() for r in rows], "params": total, "zeros": zeros,
                               "sparsity": zeros / total if total else 0.0,
                               "layers_2_4": sum(r.satisfies_2_4 for r in rows)}, indent=2))
        return
    click.echo(f"{'node':<40} {'op':<14} {'weight shape':<20} {'params':>10} {'sparsity':>9} {'2:4':>4} {'N:M':>5}")
    for r in rows:
        click.echo(f"{(r.node or r.tensor)[-40:]:<40} {r.op:<14} {str(list(r.shape)):<20} {r.params:>10,} "
                   f"{r.sparsity:>9.2%} {('yes' if r.satisfies_2_4 else 'no'):>4} {r.nm:>5}")
    n24 = sum(r.satisfies_2_4 for r in rows)
    click.echo(f"{'total':<40} {'':<14} {len(rows):<20} {total:>10,} {(zeros / total if total else 0):>9.2%} "
               f"{n24:>4}")


def _fraction(value: float | None, flag: str) -> None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise OnnxSparseError(f"{flag} must be a fraction in [0, 1] (e.g. 0.95 for 95%), got {value!r}")


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise OnnxSparseError(f"--limit must be >= 1, got {limit}")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


@main.command("eval")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", required=True, type=click.Path(), help="Labelled image folder: one sub-folder per class.")
@click.option("--labels", "labels_file", type=click.Path(dir_okay=False), default=None,
              help="Class names, one per line, in the model's class order (default: sorted folder names).")
@_BATCH_SIZE
@click.option("--limit", type=int, default=None, help="Evaluate at most this many images (balanced over classes).")
@_onnxruntime_options
def eval_(model, data, labels_file, batch_size, limit, as_json, device, preprocess, quiet) -> None:
    """Top-1 and top-5 accuracy of MODEL with onnxruntime on the labelled image folder --data."""
    from onnxsparse.evaluate import evaluate

    _check_limit(limit)
    result = evaluate(model, data, preprocess=preprocess, labels_file=labels_file, batch_size=batch_size,
                      limit=limit, progress=not quiet and not as_json, device=device)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
        return
    click.echo(f"{'model':<10} {result.model}")
    click.echo(f"{'data':<10} {result.data} ({result.images:,} images, {result.classes} classes)")
    click.echo(f"{'pipeline':<10} " + " -> ".join(result.preprocess.get("steps", [])))
    click.echo(f"{'top-1':<10} {_pct(result.top1)} ({result.correct_top1:,}/{result.images:,})")
    click.echo(f"{'top-5':<10} {_pct(result.top5)}")
    if result.skipped:
        click.echo(f"{'skipped':<10} " + ", ".join(f"{v} {k}" for k, v in result.skipped.items()))
    click.echo(f"{'time':<10} {result.seconds:.1f}s")


@main.command()
@click.argument("dense", type=click.Path(dir_okay=False))
@click.argument("sparse", type=click.Path(dir_okay=False))
@click.option("--data", required=True, type=click.Path(),
              help="Image folder (labelled folders also give accuracy), .npy/.npz folder or .npy/.npz file.")
@click.option("--labels", "labels_file", type=click.Path(dir_okay=False), default=None,
              help="Class names, one per line, in the model's class order.")
@click.option("--min-agreement", type=float, default=None,
              help="Exit with status 1 when the lowest per-output agreement (as prune's quality gate measures it) "
                   "is below this fraction (e.g. 0.99).")
@_BATCH_SIZE
@click.option("--limit", type=int, default=None, help="Compare on at most this many images.")
@_onnxruntime_options
def compare(dense, sparse, data, labels_file, min_agreement, batch_size, limit, as_json, device, preprocess,
            quiet) -> None:
    """Run DENSE and SPARSE on the same --data inputs; report agreement, output differences, sparsity."""
    from onnxsparse.evaluate import compare as run_compare

    _fraction(min_agreement, "--min-agreement")
    _check_limit(limit)
    result = run_compare(dense, sparse, data, preprocess=preprocess, labels_file=labels_file,
                         batch_size=batch_size, limit=limit, device=device)
    passed = result.passes(min_agreement)
    if as_json:
        click.echo(json.dumps({**result.as_dict(), "min_agreement": min_agreement, "passed": passed}, indent=2))
    else:
        click.echo(f"{result.images:,} images from {result.data}")
        click.echo(f"agreement         {_pct(result.agreement)} (lowest per output)")
        if result.dense_accuracy is not None:
            click.echo(f"top-1 accuracy    dense {_pct(result.dense_accuracy['top1'])}, "
                       f"sparse {_pct(result.sparse_accuracy['top1'])}")
        click.echo(f"{'output':<32} {'agreement':>9} {'cosine':>9} {'max |diff|':>11} {'mean |diff|':>12}  measure")
        for out in result.outputs:
            click.echo(f"{out['name'][-32:]:<32} {_pct(out['agreement']):>9} {out['cosine']:>9.5f} "
                       f"{out['max_abs_diff']:>11.4g} {out['mean_abs_diff']:>12.4g}  {out['measure']}")
        if not quiet:
            click.echo(f"{'layer':<40} {'op':<8} {'params':>10} {'dense':>8} {'sparse':>8}")
            for row in result.layers:
                click.echo(f"{(row.node or row.tensor)[-40:]:<40} {row.op:<8} {row.params:>10,} "
                           f"{_pct(row.dense_sparsity):>8} {_pct(row.sparse_sparsity):>8}")
        click.echo(f"{'total':<40} {'':<8} {sum(r.params for r in result.layers):>10,} "
                   f"{_pct(result.dense_sparsity):>8} {_pct(result.sparse_sparsity):>8}")
    if min_agreement is not None:
        verdict = (f"agreement {_pct(result.agreement)} "
                   f"{'>=' if passed else '<'} --min-agreement {_pct(min_agreement)}")
        if not passed:
            click.echo(f"FAILED: {verdict}", err=True)
            sys.exit(1)
        click.echo(f"PASSED: {verdict}", err=as_json)

if __name__ == "__main__":
    main()
