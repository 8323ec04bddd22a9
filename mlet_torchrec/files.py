"""File-system facts the writers rely on: an atomic swap of two directories, a durable rename, a file's
SHA-256, space reserved up front, and the words for a failed write (a full disk, no permission).

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "x"
    >>> _ = p.write_bytes(b"abc")
    >>> sha256_file(p)[:12]
    'ba7816bf8f01'
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import os
from pathlib import Path


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def fsync_file(path: Path) -> None:
    """Flush a written file's data to the disk before it is renamed into place."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (best effort: where a directory cannot be fsynced, nothing)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sha256_file(path: Path | str) -> str:
    """The SHA-256 of a file, read in 1 MiB pieces.

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "x"
    >>> _ = p.write_bytes(b"abc")
    >>> sha256_file(p)[:12]
    'ba7816bf8f01'
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def describe_os_error(e: OSError, what: Path | str) -> str:
    """One line for an ``OSError`` met while writing ``what``: a full disk, no permission, or the error."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device while writing {what}"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {what}: {e.strerror}"
    return f"cannot write {what}: {e}"


def full_disk_note(directory: Path | str) -> str:
    """What a write error means when the file system holding ``directory`` (where the output was being written:
    its temporary sibling lies there too) is full (torch.save says "unexpected pos", pyarrow "Error writing
    bytes"); empty when it has 1 MiB or more free, or ``directory`` is gone."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return ""
    free = st.f_bavail * st.f_frsize
    return f" (the file system holding {directory} is full: {free} bytes free)" if free < 2**20 else ""


def reserve(path: Path | str) -> None:
    """Allocate the blocks of a file created sparse (a memory map's backing file), so that a full disk is an
    ``OSError`` (ENOSPC) here rather than a SIGBUS when a page of the map is first written."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size:
            os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)
