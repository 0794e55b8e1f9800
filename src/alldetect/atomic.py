"""Atomic writes: a crash never leaves a truncated file that a later step would read.

The temporary file is flushed to disk before the rename and the folder after it, so that a machine that loses
power keeps either the old file or the whole new one (without the fsync, a file system may commit the rename
before the data)."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

from alldetect.errors import UserError


def safe_name(text: str, empty: str = "ensemble") -> str:
    """A file or folder name made of `text`: runs of other characters than letters, digits and ._+- become _."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or empty


def check_writable(folder: str | Path, what: str) -> Path:
    """Make `folder` and prove that a file can be written in it, before any work that would write there; else a
    UserError that names it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to {what} {folder} ({e.strerror or e}); choose another place") from None
    return folder


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; on success it is renamed over `path`, on error removed. A failed write
    (a full disk, a file-size limit, a folder that cannot be written) is a UserError that says what was kept."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600: give it the mode any new file of the user's gets
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(e, OSError) or (isinstance(e, RuntimeError) and "writ" in str(e).lower()):
            kept = f"the previous {path.name} is kept as it was" if path.exists() else "nothing was written there"
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:200]
            raise UserError(f"could not write {path} ({reason}): {kept}") from None
        raise


def _umask() -> int:
    """The process's umask, read (by setting it, the only way) once per call; other threads may create files in
    that instant, so it is set back at once."""
    mask = os.umask(0o077)  # restrictive, not 0, while it is being read
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened or synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_csv(path: str | Path, frame) -> None:
    """Write a DataFrame as CSV atomically (no index, '\\n' line endings, stable float format)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, lineterminator="\n")
