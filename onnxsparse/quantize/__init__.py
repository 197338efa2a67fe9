"""int8 quantization of the final sparse model: calibration, QDQ quantization with zero-preserving checks,
per-model choices on the selection data, and onnxruntime latency measurement."""

from onnxsparse.quantize.calibrate import METHODS, Calibration, FeedReader
from onnxsparse.quantize.latency import Latency, LatencyMeter, latency_table, measure_latency
from onnxsparse.quantize.quantize import (
    Int8Settings,
    Int8Weight,
    check_int8_weights,
    int8_weights,
    peer_int8,
    quantize_int8,
)
from onnxsparse.quantize.search import Closeness, Int8Choice, SelectionScorer, choose_int8

__all__ = ["METHODS", "Calibration", "Closeness", "FeedReader", "Int8Choice", "Int8Settings", "Int8Weight", "Latency",
           "LatencyMeter", "SelectionScorer", "check_int8_weights", "choose_int8", "int8_weights", "latency_table",
           "measure_latency", "peer_int8", "quantize_int8"]
