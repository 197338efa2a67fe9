"""Plain Python data (JSON reports, weights_only checkpoints) from values holding numpy, torch or paths."""

from __future__ import annotations

import json
from pathlib import Path


def json_default(obj):
    """``json.dumps(default=...)``: numpy scalars and arrays, tensors and tuples as lists or numbers, paths as
    strings; anything else is an error (a report must not hide what it holds)."""
    if hasattr(obj, "tolist"):  # numpy scalars and arrays, torch tensors
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def to_plain(obj):
    """``obj`` as dicts, lists, strings and numbers only."""
    return json.loads(json.dumps(obj, default=json_default))
