"""OS file locks (``flock``) that the kernel releases when their process dies, however it dies.

- :class:`RunDirLock`: one writer per run directory. ``mlet train`` holds an exclusive lock on
  ``RUN_DIR/.mlet-lock`` for the life of the job; a second writer is refused in one line naming the
  holder (pid, host, start time), which the holder writes into the file.
- :func:`pin` / :func:`unless_pinned`: a reader (collapse, evaluate, export of a live run) holds a
  shared lock on the checkpoint directory it reads; checkpoint rotation deletes a directory only
  under an exclusive lock it gets without waiting, so it never removes one that is being read.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> held = pin(d)
    >>> with unless_pinned(d) as free:
    ...     free
    False
    >>> held.release()
    >>> with unless_pinned(d) as free:
    ...     free
    True
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from mlet_torchrec.errors import UserError

LOCK_FILE = ".mlet-lock"


class RunDirBusy(UserError):
    """Another live job writes this run directory."""


class RunDirLock:
    """The exclusive lock of one run directory, taken by :meth:`acquire` and held until :meth:`release`
    (or the end of the ``with`` block, or the death of the process)."""

    def __init__(self, run_dir: Path | str, command: str = "mlet train") -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.command = command
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock without waiting; :class:`RunDirBusy` (one line, naming the holder) if it is held."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RunDirBusy(
                f"{self.path.parent} is in use by another job ({holder}); wait for it to end or choose another run.dir"
            ) from None
        who = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command, "since": _now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(who) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the kernel drops the lock; the file stays, naming the last holder
            self._fd = None

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _holder(fd: int) -> str:
    """What the lock's holder wrote about itself, as words."""
    try:
        who = json.loads(os.pread(fd, 4096, 0).decode())
        return f"{who['command']}, pid {int(who['pid'])} on host {who['host']}, since {who['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not said who it is yet"


class CheckpointPin:
    """A shared lock on a checkpoint directory: rotation leaves the directory alone while it is held."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.release()


def pin(directory: Path | str) -> CheckpointPin | None:
    """Pin ``directory`` for reading; None if it was removed (rotated away) before the pin took hold."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while a rotation deletes it
    try:
        here, held = os.stat(directory), os.fstat(fd)
        same = (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        return None
    return CheckpointPin(fd)


@contextlib.contextmanager
def unless_pinned(directory: Path | str) -> Iterator[bool]:
    """Yields True, holding ``directory`` exclusively, when no reader pins it (delete it now); False when
    one does (leave it). Never waits."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
