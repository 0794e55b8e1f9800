"""Atomic writes: a crash never leaves a truncated file that a later step would read.

The temporary file is flushed to disk before the rename and the folder after it, so that a machine that loses
power keeps either the old file or the whole new one (without the fsync, a file system may commit the rename
before the data). Folders that are one output (a report, an export) are made whole in a temporary folder beside
their place and swapped in (`temporary_folder`, `replace_folder`)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import os
import re
import shutil
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


def temporary_folder(parent: str | Path, name: str) -> Path:
    """A new hidden folder in `parent` to build the output folder `name` in (unique, so never one of the user's),
    with the mode the user's umask gives new folders (mkdtemp makes it 0700)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def replace_folder(tmp: Path, final: Path) -> None:
    """Put the finished folder `tmp` in the place of `final`, which is absent or an earlier output of the same
    command (the caller checks that it holds nothing else): a reader sees the old or the new folder, never a mix.
    Where the file system can (Linux's renameat2), the two are exchanged in one step; elsewhere the old one is
    moved aside first. The old folder is then removed. The new folder's files reach the disk before the swap."""
    for folder, _, names in os.walk(tmp):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(folder))
    if final.exists() or final.is_symlink():
        if _exchange(tmp, final):
            old_parent = None
            old = tmp  # now holds the old folder
        else:
            old_parent = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            old = old_parent / final.name
            final.rename(old)
            tmp.rename(final)
        _fsync_dir(final.parent)
        shutil.rmtree(old_parent or old, ignore_errors=True)
    else:
        tmp.rename(final)
        _fsync_dir(final.parent)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (renameat2 with RENAME_EXCHANGE); False where the system cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # no renameat2, or a file system without exchange: move aside instead
    raise OSError(err, os.strerror(err), str(b))


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


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, in hex (about 1 GB/s)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_csv(path: str | Path, frame) -> None:
    """Write a DataFrame as CSV atomically (no index, '\\n' line endings, stable float format)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, lineterminator="\n")
