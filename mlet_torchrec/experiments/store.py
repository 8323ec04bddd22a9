"""A sweep's results store: an append-only JSON-lines file, one complete line per finished run.

A line is complete or absent: it is written with one ``os.write`` and fsynced, and the torn tail a killed
writer can leave (a line without its newline) is cut off before the next append, so readers never see half
a record and a resumed sweep reruns the cell that was being written.

Example:
    >>> import pathlib, tempfile
    >>> store = ResultsStore(pathlib.Path(tempfile.mkdtemp()) / "results.jsonl")
    >>> store.append({"key": "abc", "status": "ok"})
    >>> store.done_keys()
    {'abc'}
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger("mlet.sweep")

STORE_VERSION = 1


class ResultsStore:
    """Append-only JSON-lines file; a line is written with one ``os.write`` then fsynced (see the module)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def load(self) -> list[dict[str, Any]]:
        return load_results(self.path)

    def done_keys(self) -> set[str]:
        return {r["key"] for r in self.load() if r.get("status") in ("ok", "diverged")}

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, sort_keys=True, default=json_default) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # sweeps in other processes may append to the same store
                _drop_torn_tail(fd, self.path)
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)


def _drop_torn_tail(fd: int, path: Path) -> None:
    """Cut a last line without its newline (a writer killed mid-write): the record is then absent, not half."""
    size = os.fstat(fd).st_size
    if not size or os.pread(fd, 1, size - 1) == b"\n":
        return
    keep = size
    while keep > 0:
        start = max(0, keep - 65536)
        chunk = os.pread(fd, keep - start, start)
        nl = chunk.rfind(b"\n")
        if nl >= 0:
            keep = start + nl + 1
            break
        keep = start
    log.warning("%s: dropping an incomplete last line (%d bytes) left by an interrupted write", path, size - keep)
    os.ftruncate(fd, keep)
    os.fsync(fd)


def json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "as_dict"):
        return o.as_dict()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load_results(path: Path | str) -> list[dict[str, Any]]:
    """Every complete line of a store (a torn last line from an interrupted write is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: skipping an incomplete line", path, n)
            continue
        if isinstance(rec, dict) and "key" in rec:
            out.append(rec)
    return out
