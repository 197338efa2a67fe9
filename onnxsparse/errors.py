"""The one exception type user errors raise."""


class OnnxSparseError(Exception):
    """A user-facing error: bad input, bad option, or a model the tool cannot handle.

    The message names the bad value and what is allowed; the CLI prints it without a traceback.
    """


class QualityGateFailed(OnnxSparseError):
    """The pruned model agrees with the dense model less than ``--min-agreement`` on the selection.

    Nothing is written (the report is, when asked for); the CLI exits with status 3, distinct from user errors (2).
    """

    def __init__(self, agreement: float, threshold: float, measure: str, samples: int):
        self.agreement, self.threshold, self.measure, self.samples = agreement, threshold, measure, samples
        super().__init__(
            f"agreement with the dense model {agreement:.2%} ({measure}, {samples} samples) is below "
            f"--min-agreement {threshold:.2%} by {100 * (threshold - agreement):.2f} points; nothing was written"
        )
