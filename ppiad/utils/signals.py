"""Graceful stop: the first SIGINT/SIGTERM asks the trainer to checkpoint at the next step boundary and exit 0;
a second SIGINT aborts at once (KeyboardInterrupt)."""
from __future__ import annotations

import signal
import sys
import threading


class GracefulStop:
    """Context manager: while active, `.requested` turns True on SIGINT/SIGTERM instead of killing the process.

        with GracefulStop() as stop:
            for step in ...:
                train_step()
                if stop.requested:
                    save_checkpoint(...); break
    """

    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM), announce: bool = True):
        self.signals = tuple(signals)
        self.announce = announce
        self.requested = False
        self.signal_name = ""
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: the user wants out now
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        if self.announce:
            print(f"\n{self.signal_name} received: saving a checkpoint after the current step, then exiting "
                  f"(press Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def request(self) -> None:
        """Ask for a stop from code (tests, a max-time budget)."""
        self.requested = True

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
