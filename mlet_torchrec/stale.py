"""What a killed writer leaves behind: the hidden temporaries' names and the sweep that removes them.

An output is built in a hidden sibling ``.NAME.mlet-tmp-PID-HEX`` (an old one set aside while it is replaced:
``.NAME.mlet-old-PID-HEX``; :mod:`mlet_torchrec.io`). A writer killed before its rename leaves that sibling;
the next write to the same output removes it once process PID is gone.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> (d / f".out{TMP_TAG}999999999-ab12").mkdir()   # no such process
    >>> [p.name for p in sweep_stale_in(d)]
    ['.out.mlet-tmp-999999999-ab12']
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

TMP_TAG = ".mlet-tmp-"
"""In the name of an output's temporary sibling, before the writer's PID."""
OLD_TAG = ".mlet-old-"
"""In the name of a replaced output set aside, before the writer's PID."""


def new_token() -> str:
    """``PID-HEX``, what follows a tag in a temporary's name: this process's PID (which :func:`sweep_stale` reads
    back) and 8 random hex digits."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` exists and is not a zombie (a killed writer's temporaries are stale)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def sweep_stale(output: Path) -> None:
    """Remove hidden siblings left by a killed write to ``output`` (only ours, only of dead processes)."""
    _sweep(output.parent, output.name, any_pid=False)


def sweep_stale_in(directory: Path | str, any_pid: bool = False) -> list[Path]:
    """Remove the hidden temporaries of interrupted writes to any output in ``directory``; returns them.

    Only those of dead processes, unless ``any_pid``: for a caller that knows it is the directory's
    only writer (a training job tidying its own run directory before it starts, whose earlier
    attempt may have run on another machine).
    """
    return _sweep(Path(directory), None, any_pid)


def _sweep(parent: Path, name: str | None, any_pid: bool) -> list[Path]:
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    for child in sorted(parent.iterdir()):
        for tag in (TMP_TAG, OLD_TAG):
            if tag not in child.name or not child.name.startswith(f".{name}{tag}" if name else "."):
                continue
            pid_text = child.name.rsplit(tag, 1)[1].split("-", 1)[0]
            if (
                pid_text.isdigit()
                and child.is_dir()
                and not child.is_symlink()
                and (any_pid or not pid_alive(int(pid_text)))
            ):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
            break
    return removed
