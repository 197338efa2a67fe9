"""Wall time per named phase, one mechanism for the pipeline and the methods.

A phase also tags a CUDA out-of-memory error raised inside it with its name (:func:`onnxsparse.device.oom_phase`),
and, where the timer is the outermost one (``interrupts=True``), turns Ctrl-C / SIGTERM into
:class:`Interrupted` naming the phase it stopped.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from onnxsparse.device import oom_phase


class Interrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM during a run; ``phase`` says where. Nothing was written."""

    def __init__(self, phase: str) -> None:
        super().__init__(phase)
        self.phase = phase


class Phases:
    """Seconds spent per phase (a phase entered twice adds up)."""

    def __init__(self, *, interrupts: bool = False) -> None:
        self.seconds: dict[str, float] = {}
        self.interrupts = interrupts

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            with oom_phase(name):
                yield
        except KeyboardInterrupt as exc:
            if self.interrupts and not isinstance(exc, Interrupted):
                raise Interrupted(name) from None
            raise
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}
