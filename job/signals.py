"""SIGTERM/SIGINT → "stop at the next safe point"; a second signal exits at once.

Everything the job writes is written atomically, so exiting on the second signal corrupts nothing.
"""
from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger("job")


class StopFlag:
    def __init__(self):
        self.signum: int | None = None

    def install(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            log.error("second signal %d: exiting now", signum)
            os._exit(128 + signum)
        self.signum = signum
        log.warning("signal %d: stopping after the current step and writing a checkpoint", signum)

    def __call__(self) -> int | None:
        return self.signum
