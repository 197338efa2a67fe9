"""Calibration data: image folders, tensor files, readers and datasets, preprocessed for the model.

``load_calibration`` reads a source into a :class:`CalibrationSet` (train and selection splits);
``PreprocessConfig`` holds the user's preprocessing options, resolved against the model by
``resolve_preprocess``; ``augment_batch`` is the training-time augmentation for image batches.
"""

from onnxsparse.data.augment import augment_batch
from onnxsparse.data.calibration import default_held_out_size, load_calibration
from onnxsparse.data.calibration_set import CalibrationSet, check_batch_size
from onnxsparse.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, SKIP_REASONS
from onnxsparse.data.preprocess_options import PRESETS, PreprocessConfig, parse_floats, parse_scale, parse_size
from onnxsparse.data.preprocess_resolution import ResolvedPreprocess, Setting, resolve_preprocess
from onnxsparse.data.spec import InputSpec, input_specs

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "PRESETS",
    "SKIP_REASONS",
    "CalibrationSet",
    "InputSpec",
    "PreprocessConfig",
    "ResolvedPreprocess",
    "Setting",
    "augment_batch",
    "check_batch_size",
    "default_held_out_size",
    "input_specs",
    "load_calibration",
    "parse_floats",
    "parse_scale",
    "parse_size",
    "resolve_preprocess",
]
