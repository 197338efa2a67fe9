"""The shared value checks: what each accepts, what it returns, and that its error names the value and the rule."""

from __future__ import annotations

import numpy as np
import pytest

from onnxsparse.errors import OnnxSparseError
from onnxsparse.validate import boolean, int_at_least, number_in, one_of, optional_int_at_least


def test_int_at_least_takes_python_and_numpy_integers_and_refuses_bools_floats_and_small_values():
    assert int_at_least(np.int64(3), "--n") == 3 and type(int_at_least(np.int64(3), "--n")) is int
    assert int_at_least(0, "--n", minimum=0) == 0
    for bad in (True, 2.0, "2", 0, None):
        with pytest.raises(OnnxSparseError, match=f"--n must be an integer >= 1, got {bad!r}"):
            int_at_least(bad, "--n")
    assert optional_int_at_least(None, "--n") is None
    with pytest.raises(OnnxSparseError, match="--n must be an integer >= 2, got 1"):
        optional_int_at_least(1, "--n", minimum=2)


def test_number_in_names_the_interval_with_its_open_ends():
    assert number_in(1, "--x", 0, 1) == 1.0
    with pytest.raises(OnnxSparseError, match=r"--x must be in \[0, 1\), got 1"):
        number_in(1, "--x", 0, 1, hi_open=True)
    with pytest.raises(OnnxSparseError, match=r"--x must be in \(0, 1\], got 0"):
        number_in(0, "--x", 0, 1, lo_open=True)
    for bad in (True, float("nan"), "0.5"):
        with pytest.raises(OnnxSparseError, match="--x must be in"):
            number_in(bad, "--x", 0, 1)


def test_one_of_and_boolean_name_what_is_allowed():
    assert one_of("RGB", "--order", ("rgb", "bgr"), ignore_case=True) == "rgb"
    with pytest.raises(OnnxSparseError, match="--order must be one of rgb, bgr, got 'RGB'"):
        one_of("RGB", "--order", ("rgb", "bgr"))
    with pytest.raises(OnnxSparseError, match="--order must be one of rgb, bgr, got True"):
        one_of(True, "--order", ("rgb", "bgr"))
    assert boolean(False, "augment") is False
    with pytest.raises(OnnxSparseError, match="augment must be True or False, got 1"):
        boolean(1, "augment")
