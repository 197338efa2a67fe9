"""Structured (channel) pruning: dependency groups on the ONNX graph, channel selection and refit."""

from onnxsparse.structured.groups import ChannelAnalysis, ChannelGroup, ParamSlice, Tap, analyse

__all__ = ["ChannelAnalysis", "ChannelGroup", "ParamSlice", "Tap", "analyse"]
