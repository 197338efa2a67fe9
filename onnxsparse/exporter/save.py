"""Atomic saving: a temporary file in the target folder, checked, then renamed over the final name."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path

import onnx

from onnxsparse.errors import OnnxSparseError
from onnxsparse.importer.load import external_tensors

logger = logging.getLogger(__name__)

# protobuf cannot serialise a message over 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def staged_data_path(output: str | os.PathLike) -> Path:
    """A fresh temporary name for external data written ahead of ``save_atomic(..., staged_data=)``."""
    out = Path(output)
    return out.with_name(f".{out.name}.data.{uuid.uuid4().hex}.tmp")


def check_output_path(output: str | os.PathLike, *, inputs: tuple[str | os.PathLike, ...] = (), force: bool = False) -> Path:
    """Refuse to overwrite the input or an existing file (unless ``force``); probe that the folder is writable."""
    out = Path(output)
    for src in inputs:
        if src is not None and (Path(src).resolve() == out.resolve()
                                or Path(src).exists() and out.exists() and os.path.samefile(src, out)):
            raise OnnxSparseError(f"output {str(out)!r} is the input model; choose another -o path")
    if out.exists() and not force:
        raise OnnxSparseError(f"output {str(out)!r} already exists; pass --force to overwrite it")
    if out.exists() and out.is_dir():
        raise OnnxSparseError(f"output {str(out)!r} is a folder; give a file name")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OnnxSparseError(f"output folder {str(parent)!r} does not exist")
    probe = parent / f".onnxsparse-probe-{uuid.uuid4().hex}"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"\0" * 4096)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise OnnxSparseError(f"cannot write to output folder {str(parent)!r}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return out


def save_atomic(
    model: onnx.ModelProto,
    output: str | os.PathLike,
    *,
    validate: Callable[[Path], None] | None = None,
    external_data: bool | None = None,
    staged_data: Path | None = None,
) -> Path:
    """Save ``model`` to a temporary file next to ``output``, run ``validate(tmp_path)``, then rename.

    Models over ~2 GB (or with ``external_data=True``) store tensors in ``<output name>.data``.
    ``staged_data``: ``model``'s external tensors are already written to this file in ``output``'s folder
    (see :func:`staged_data_path`); it becomes ``<output name>.data`` (and is removed on failure).
    On any failure nothing is left at ``output``.
    """
    out = Path(output)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    data_name = f"{out.name}.data"
    created: list[Path] = [tmp]
    if staged_data is not None:
        if Path(staged_data).resolve().parent != out.resolve().parent:
            raise OnnxSparseError(f"internal error: staged data {str(staged_data)!r} is not beside {str(out)!r}")
        use_external, tmp_data = True, Path(staged_data)
        created.append(tmp_data)
    else:
        use_external = external_data if external_data is not None else model.ByteSize() > EXTERNAL_DATA_THRESHOLD
        tmp_data = out.with_name(f".{data_name}.{uuid.uuid4().hex}.tmp")
    try:
        if staged_data is not None:
            onnx.save_model(model, str(tmp))
        elif use_external:
            # save_model(save_as_external_data=True) rewrites the proto it is given: hand it a copy.
            staged = onnx.ModelProto()
            staged.CopyFrom(model)
            onnx.save_model(
                staged, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                location=tmp_data.name, size_threshold=1024,
            )
            created.append(tmp_data)
        else:
            onnx.save_model(model, str(tmp))
        if validate is not None:
            validate(tmp)
        if use_external:
            # The model must name the final data file; rewrite the location and save the (small) graph again.
            saved = onnx.load(str(tmp), load_external_data=False)
            for tensor in onnx.external_data_helper._get_all_tensors(saved):  # noqa: SLF001
                for entry in tensor.external_data:
                    if entry.key == "location" and entry.value == tmp_data.name:
                        entry.value = data_name
            onnx.save_model(saved, str(tmp))
            os.replace(tmp_data, out.with_name(data_name))
        os.replace(tmp, out)
    except OSError as exc:
        raise OnnxSparseError(f"could not write {str(out)!r}: {exc.strerror or exc}") from None
    finally:
        for path in created:
            with contextlib.suppress(OSError):
                if path.exists():
                    path.unlink()
    logger.info("wrote %s", out)
    return out


class _CountingSink(io.RawIOBase):
    """A seekable write-only stream that keeps no data, only the size a file would have (archive sizes
    without writing an archive; seekable so zipfile writes the same headers it writes to a file)."""

    def __init__(self) -> None:
        self.size = 0
        self.pos = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = base + offset
        return self.pos

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B"))
        self.pos += n
        self.size = max(self.size, self.pos)
        return n


def zip_size(*members: str | os.PathLike | bytes, level: int = 6) -> int:
    """Size in bytes of a zip archive (deflate, ``level``) holding ``members``: file paths or raw bytes."""
    sink = _CountingSink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=level) as archive:
        for i, member in enumerate(members):
            if isinstance(member, (bytes, bytearray, memoryview)):
                archive.writestr(f"member{i}", bytes(member))
            else:
                archive.write(os.fspath(member), arcname=Path(member).name)
    return sink.size


def model_files(path: str | os.PathLike) -> list[Path]:
    """``path`` and the external-data files it references (existing ones, in its folder)."""
    p = Path(path)
    files = [p]
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception:  # noqa: BLE001 - sizes are informational; an unreadable file counts alone
        return files
    locations = dict.fromkeys(info["location"] for _, info in external_tensors(model) if "location" in info)
    return files + [p.parent / loc for loc in locations if (p.parent / loc).is_file()]


def files_size(path: str | os.PathLike) -> int:
    """Bytes on disk of a model file together with its external data."""
    return sum(f.stat().st_size for f in model_files(path))
