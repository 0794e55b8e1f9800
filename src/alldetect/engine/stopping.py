"""Stopping on request: SIGTERM (what schedulers send) or Ctrl-C finishes the current training step, writes a
checkpoint and exits with code 143; a second Ctrl-C quits at once."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading


class StopRequested(Exception):
    """Training stopped at a signal after writing a resumable checkpoint; the message says how to resume."""


class StopFlag:
    def __init__(self) -> None:
        self.signal_name: str | None = None

    def __bool__(self) -> bool:
        return self.signal_name is not None


@contextlib.contextmanager
def stop_on_signals():
    """Yield a StopFlag that SIGTERM / SIGINT set (only in the main thread; elsewhere it never fires)."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.signal_name = signal.Signals(signum).name
        print(f"\n{flag.signal_name}: stopping after this training step and writing a checkpoint"
              + (" (Ctrl-C again quits at once)" if signum == signal.SIGINT else ""), file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
