"""Where a pretraining step's time goes: seconds per phase (data, text, VAE, conditioning,
forward, backward, optimizer), summed over the steps, for the speed bench."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext


class StepPhases:
    def __init__(self, synchronize: Callable[[], None] | None = None, enabled: bool = True):
        self.seconds: dict[str, float] = defaultdict(float)
        self.synchronize = synchronize or (lambda: None)  # a GPU's queue, drained at each phase's ends
        self.enabled = enabled

    @classmethod
    def off(cls) -> StepPhases:
        return cls(enabled=False)

    def __call__(self, name: str):  # noqa: ANN204
        return self._timed(name) if self.enabled else nullcontext()

    @contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        self.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.synchronize()
            self.seconds[name] += time.perf_counter() - start

    def take(self) -> dict[str, float]:
        """The seconds so far, and start again from zero."""
        taken, self.seconds = dict(self.seconds), defaultdict(float)
        return taken
