"""Loading ONNX files safely, external data included."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from onnxsparse.errors import OnnxSparseError

logger = logging.getLogger(__name__)


def external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    """A tensor's external-data entries (location, offset, length, ...) as a dict."""
    return {entry.key: entry.value for entry in tensor.external_data}


def external_tensors(model: onnx.ModelProto) -> Iterator[tuple[onnx.TensorProto, dict[str, str]]]:
    """The tensors ``model`` keeps as external data (initializers and attributes), with their entries."""
    for tensor in external_data_helper._get_all_tensors(model):  # noqa: SLF001 - stable helper used by onnx itself
        if external_data_helper.uses_external_data(tensor):
            yield tensor, external_info(tensor)


def check_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    """Refuse external-data locations that escape ``base_dir`` or point past the end of their file."""
    base = base_dir.resolve()
    for tensor, info in external_tensors(model):
        location = info.get("location", "")
        if not location:
            raise OnnxSparseError(f"tensor {tensor.name!r} uses external data without a location")
        if os.path.isabs(location) or location.startswith(("/", "\\")):
            raise OnnxSparseError(
                f"tensor {tensor.name!r}: external data location {location!r} is an absolute path; "
                "only paths inside the model's folder are allowed"
            )
        target = (base / location).resolve()
        if base != target and base not in target.parents:
            raise OnnxSparseError(
                f"tensor {tensor.name!r}: external data location {location!r} escapes the model's folder {str(base)!r}"
            )
        if not target.is_file():
            raise OnnxSparseError(f"tensor {tensor.name!r}: external data file {str(target)!r} does not exist")
        size = target.stat().st_size
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else size - offset
        except ValueError as exc:
            raise OnnxSparseError(f"tensor {tensor.name!r}: bad external data offset/length: {exc}") from None
        if offset < 0 or length < 0 or offset + length > size:
            raise OnnxSparseError(
                f"tensor {tensor.name!r}: external data range [{offset}, {offset + length}) lies past the end of "
                f"{location!r} ({size} bytes)"
            )


# Peak memory of a run relative to the tensor bytes, for (tensors stored as external data, tensors inside the
# file). External data stays on disk: the torch teacher shares its storage with the change-detection
# snapshots, the student is one copy, write-back streams tensor by tensor and the onnxruntime sessions run one
# after the other (measured: 2.65x for a 2.4 GB model). Tensors inside the file are held by the proto too,
# and its normalised copy and onnx2torch's shape inference copy them again.
MEMORY_FACTOR = (3.0, 6.0)
# ``inspect`` reads one external weight at a time; a single-file model is held twice (proto + its copy).
INSPECT_MEMORY_FACTOR = (1.0, 2.0)


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def tensor_bytes(path: Path, model: onnx.ModelProto) -> tuple[int, int]:
    """Bytes of the external data ``model`` references, and of the model file itself."""
    outside = 0
    for _, info in external_tensors(model):
        if "length" in info:
            outside += int(info["length"])
        else:
            outside += (path.parent / info["location"]).stat().st_size
    return outside, path.stat().st_size


def check_fits_in_memory(path: Path, model: onnx.ModelProto, factors: tuple[float, float] = MEMORY_FACTOR,
                         purpose: str = "pruning it") -> None:
    """Refuse, before loading tensors, a model whose run cannot fit in this machine's memory.

    ``factors``: peak memory per tensor byte stored as external data, and per byte of the model file.
    """
    outside, inside = tensor_bytes(path, model)
    needed = outside * factors[0] + inside * factors[1]
    memory = physical_memory()
    if memory is not None and needed > memory:
        raise OnnxSparseError(
            f"{str(path)!r} holds {(outside + inside) / 2**30:.1f} GiB of tensors; {purpose} needs about "
            f"{needed / 2**30:.1f} GiB of memory and this machine has {memory / 2**30:.1f} GiB"
        )


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(True for _ in external_tensors(model))


def load_model(path: str | os.PathLike, *, external_data: bool = True,
               memory_factors: tuple[float, float] = MEMORY_FACTOR, purpose: str = "pruning it") -> onnx.ModelProto:
    """Load an ONNX model; user errors raise :class:`OnnxSparseError`.

    ``external_data=False`` leaves tensors stored as external data on disk (checked, not read): the proto
    stays small and its tensors are read with ``numpy_helper.to_array(tensor, base_dir=path's folder)``.
    """
    p = Path(path)
    if not p.exists():
        raise OnnxSparseError(f"model file {str(p)!r} does not exist")
    if not p.is_file():
        raise OnnxSparseError(f"model path {str(p)!r} is not a file")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, TypeError) as exc:
        raise OnnxSparseError(f"{str(p)!r} is not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    if not model.HasField("graph") or (len(model.graph.node) == 0 and len(model.graph.output) == 0):
        raise OnnxSparseError(f"{str(p)!r} is not an ONNX model: it has no graph")
    check_external_data(model, p.parent)
    check_fits_in_memory(p, model, memory_factors, purpose)
    if external_data and has_external_data(model):
        external_data_helper.load_external_data_for_model(model, str(p.parent))
        logger.info("loaded external data for %s", p)
    return model


def model_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise OnnxSparseError("the model imports no default-domain (ai.onnx) opset")
