"""Exporter: write-back by tensor name, verification, atomic save."""

from onnxsparse.exporter.save import check_output_path, save_atomic
from onnxsparse.exporter.verify import Verification, compare_sessions, ort_session, verify_file
from onnxsparse.exporter.writeback import tensor_arrays, write_back

__all__ = [
    "Verification",
    "check_output_path",
    "compare_sessions",
    "ort_session",
    "save_atomic",
    "tensor_arrays",
    "verify_file",
    "write_back",
]
