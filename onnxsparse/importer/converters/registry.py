"""Converters of our own, consulted before onnx2torch's, keyed like onnx2torch's: (op type, opset range).

A converter takes onnx2torch's ``(OnnxNode, OnnxGraph)`` and returns an ``OperationConverterResult``, or
``None`` to leave the node to onnx2torch. Nothing is registered into onnx2torch's own table: the lookup is
swapped in only while :func:`installed` is active (one conversion), under a lock, and restored afterwards.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from onnxsparse.errors import OnnxSparseError

Converter = Callable[[Any, Any], Any]


@dataclass(frozen=True)
class ConverterKey:
    """Ops of type ``op_type`` (default domain) in models of opset ``first``..``last`` (inclusive)."""

    op_type: str
    first: int
    last: int

    def covers(self, op_type: str, opset: int) -> bool:
        return op_type == self.op_type and self.first <= opset <= self.last

    def __str__(self) -> str:
        return f"({self.op_type}, opset {self.first}-{self.last})"


class ConverterError(NotImplementedError):
    """A converter of ours cannot convert a node. Raised inside a converter with the reason only; the
    registry adds the converter's ``key`` and the ``node`` name (of the copy onnx2torch converts)."""

    def __init__(self, reason: str, *, key: ConverterKey | None = None, node: str = "") -> None:
        self.reason, self.key, self.node = reason, key, node
        where = f"onnxsparse converter {key} failed on node {node!r}: " if key is not None else ""
        super().__init__(where + reason)


class Registry:
    """An ordered table of (key, converter); the first key covering a node wins."""

    def __init__(self) -> None:
        self._entries: list[tuple[ConverterKey, Converter]] = []

    def add(self, op_type: str, first: int, last: int) -> Callable[[Converter], Converter]:
        if first > last:
            raise OnnxSparseError(f"converter opset range {first}-{last} for {op_type} is empty")
        key = ConverterKey(op_type, first, last)
        for existing, _ in self._entries:
            if existing.op_type == op_type and not (last < existing.first or first > existing.last):
                raise OnnxSparseError(f"converter {key} overlaps the registered {existing}")

        def deco(fn: Converter) -> Converter:
            self._entries.append((key, fn))
            return fn

        return deco

    def find(self, op_type: str, opset: int, domain: str = "") -> tuple[ConverterKey, Converter] | None:
        if domain not in ("", "ai.onnx"):
            return None
        for key, fn in self._entries:
            if key.covers(op_type, opset):
                return key, fn
        return None

    def keys(self) -> list[ConverterKey]:
        return [key for key, _ in self._entries]


def module_result(node: Any, module: Any) -> Any:
    """onnx2torch's conversion result for ``module`` called with the node's own inputs and outputs."""
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

    return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))


REGISTRY = Registry()
_LOCK = threading.Lock()


def _wrap(key: ConverterKey, ours: Converter, theirs: Callable[[], Converter]) -> Converter:
    def convert(node: Any, graph: Any) -> Any:
        try:
            result = ours(node, graph)
        except ConverterError as exc:
            raise ConverterError(exc.reason, key=key, node=node.name) from None
        except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as exc:
            raise ConverterError(f"{type(exc).__name__}: {exc}", key=key, node=node.name) from exc
        return theirs()(node, graph) if result is None else result

    return convert


@contextlib.contextmanager
def installed(registry: Registry = REGISTRY) -> Iterator[None]:
    """onnx2torch's ``convert`` consults ``registry`` first while this is active."""
    import onnx2torch.converter as o2t

    with _LOCK:
        original = o2t.get_converter

        def get_converter(operation_type: str, version: int, domain: str = "") -> Converter:
            found = registry.find(operation_type, version, domain)
            if found is None:
                return original(operation_type=operation_type, version=version, domain=domain)
            key, ours = found
            return _wrap(key, ours, lambda: original(operation_type=operation_type, version=version, domain=domain))

        o2t.get_converter = get_converter
        try:
            yield
        finally:
            o2t.get_converter = original
