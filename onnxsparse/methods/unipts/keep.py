"""The keep rule: the trained candidate replaces its start only where the selection resolves it as closer to the
dense model."""

from __future__ import annotations

import math

from onnxsparse.errors import OnnxSparseError
from onnxsparse.methods.unipts.candidate import Candidate
from onnxsparse.metrics import PairedComparison, paired_improvement

# The trained model replaces its start when closer to the dense model on the selection split by more than
# KEEP_TRAINED_Z standard errors (one-sided 95%) or by more than KEEP_TRAINED_MARGIN of the start's distance: a
# few dozen samples cannot resolve a small gain, and heavy-tailed distances hide a large one (docs/decisions.md)
KEEP_TRAINED_Z = 1.645
KEEP_TRAINED_MARGIN = 0.10
RULE = (f"trained kept if closer on average by more than {KEEP_TRAINED_Z} standard errors or by more than "
        f"{KEEP_TRAINED_MARGIN:.0%} of the start's distance, unless farther on more samples than closer by more "
        f"than {KEEP_TRAINED_Z} standard deviations of a sign test")


def keep(trained: Candidate, start: Candidate) -> tuple[Candidate, PairedComparison]:
    """The candidate to keep of ``trained`` and its ``start`` (both scored on the same selection samples), and
    their paired comparison: :meth:`PairedComparison.better` (a selection of a few dozen samples cannot tell a
    small gain from noise, and the start, a deterministic fit, is the safer of two indistinguishable models)."""
    if trained.score is None or start.score is None:
        raise OnnxSparseError("internal error: the keep rule compares scored candidates only")
    paired = paired_improvement(trained.score, start.score)
    if paired.better(KEEP_TRAINED_Z, KEEP_TRAINED_MARGIN) and math.isfinite(trained.score.score):
        return trained, paired
    return start, paired
