"""Stopping on request: SIGTERM, or SIGUSR1 (slurm's warning before a time limit), ends the run with a
checkpoint at the next step boundary, which ``checkpoint.resume=auto`` continues from."""

from __future__ import annotations

import signal
import threading
from typing import Optional

import torch

from braid.parallel.distributed import any_rank

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """Notes a stop signal while installed; the trainer acts on it between steps, not in the handler,
    so that no step or checkpoint is cut in half."""

    def __init__(self) -> None:
        self.received: Optional[str] = None  # the latest signal's name, e.g. "SIGUSR1"
        self.previous: dict = {}

    def install(self) -> StopSignals:
        # Python runs handlers in the main thread only and refuses to set them from any other.
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self.previous[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def agreed(self, device: torch.device) -> bool:
        """Collective: whether any rank has received a stop signal."""
        # Ranks may see the signal at different steps; agree so that all stop at the same one.
        return any_rank(self.received is not None, device)

    def reason(self) -> str:
        return self.received or "a signal on another rank"

    def restore(self) -> None:
        """Put back the handlers that ``install`` replaced."""
        for sig, previous in self.previous.items():
            signal.signal(sig, previous)
        self.previous = {}
