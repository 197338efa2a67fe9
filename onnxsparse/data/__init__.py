"""Calibration data: image folders, tensor files, readers and datasets, preprocessed for the model.

Modules: ``calibration`` loads a source and splits it (``load_calibration``); ``calibration_set`` holds the
train, selection and verification splits (:class:`CalibrationSet`) and serves them in batches;
``preprocess_options`` parses the user's preprocessing options (``PreprocessConfig``, presets);
``preprocess_resolution`` resolves them against the model, its sidecar file and metadata (``resolve_preprocess``);
``images`` decodes, ``tensors`` collects .npy/.npz files, feeds, readers and datasets, ``augment`` is the
training-time augmentation for image batches.
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
