"""The one exception type user errors raise."""


class OnnxSparseError(Exception):
    """A user-facing error: bad input, bad option, or a model the tool cannot handle.

    The message names the bad value and what is allowed; the CLI prints it without a traceback.
    """
