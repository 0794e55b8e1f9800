"""Exclusive locks on what one process writes at a time (a run folder, a fold file being made).

An operating-system lock (filelock, flock on Unix) is released when its holder exits, however it exits, so a
lock left by a killed process is never in the way; the holder's pid is written beside it to name it."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from filelock import FileLock, Timeout

from alldetect.errors import UserError


@contextlib.contextmanager
def exclusive(lock_file: Path, what: str, wait: bool = False):
    """Hold `lock_file` while the block runs; if another process holds it, a UserError names `what` and the pid
    (wait=True: wait for it to finish instead)."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    owner = lock_file.with_name(lock_file.name + ".pid")
    lock = FileLock(str(lock_file), timeout=-1 if wait else 0)
    try:
        lock.acquire()
    except Timeout:
        pid = owner.read_text().strip() if owner.is_file() else "unknown"
        raise UserError(f"{what} is in use by another process (pid {pid}): wait for it to finish, or stop it, "
                        "and try again") from None
    try:
        owner.write_text(f"{os.getpid()}\n")
        yield
    finally:
        owner.unlink(missing_ok=True)
        lock.release()
