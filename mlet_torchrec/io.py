"""The one way ``mlet`` writes its outputs: complete or not at all, and never over what it did not write.

Every command that writes a directory (synth, convert, checkpoints, collapse, export, compression,
report) builds it in a hidden temporary sibling and moves it into place with one rename. When an
older output is replaced, the two directories are swapped atomically (``renameat2`` with
``RENAME_EXCHANGE``), so a crash or SIGKILL at any instant leaves the old output or the complete new
one under the output name, never a mix and never nothing. Each output carries a marker file naming
the command, version and the files written; ``--overwrite`` replaces only an empty directory or one with
that marker holding nothing but the files it lists.

    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "result"
    >>> with atomic_output(out, command="doctest") as tmp:
    ...     _ = (tmp / "table.txt").write_text("1 2 3")
    >>> sorted(p.name for p in out.iterdir())
    ['.mlet-output.json', 'table.txt']
    >>> is_ours(out)
    True

Single files (metadata, pointers) go through :func:`atomic_write_text`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

from mlet_torchrec.errors import UserError
from mlet_torchrec.files import describe_os_error, exchange, fsync_dir, fsync_file, full_disk_note
from mlet_torchrec.stale import OLD_TAG, TMP_TAG, new_token, sweep_stale

T = TypeVar("T")

MARKER = ".mlet-output.json"
"""The file that says a directory was written by ``mlet`` (and may be replaced with --overwrite)."""


class OutputError(UserError):
    """An output path that cannot be used: it would delete foreign files, an input, or a home."""


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("mlet-torchrec")
    except Exception:  # running from a source tree that was never installed
        return "unknown"


def is_ours(path: Path) -> bool:
    """True if ``path`` is a directory that ``mlet`` wrote (it carries the marker)."""
    return (Path(path) / MARKER).is_file()


def _resolved(path: Path | str) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(path)))).resolve()


def _contains(outer: Path, inner: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output_path(output: Path | str, inputs: Iterable[Path | str] = (), overwrite: bool = False) -> Path:
    """Refuse outputs that could destroy something; returns the resolved output path.

    Always refused: the file-system root, the home directory, the working directory and its parents,
    and any path that equals or contains one of ``inputs``. An existing non-empty directory is replaced
    only with ``overwrite`` and only if ``mlet`` wrote it (it has the marker).

        >>> check_output_path("/", overwrite=True)
        Traceback (most recent call last):
        ...
        mlet_torchrec.io.OutputError: refusing to write to / (the file-system root); choose a new directory
    """
    out = check_location(output, inputs)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputError(f"refusing to write to {out}: it exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not is_ours(out):
            raise OutputError(
                f"refusing to replace {out}: it holds files mlet did not write (no {MARKER}); "
                "choose another output directory"
            )
        if not overwrite:
            raise OutputError(f"{out} exists; pass --overwrite to replace it")
        unlisted = _unlisted(out)
        if unlisted:
            raise OutputError(
                f"refusing to replace {out}: it holds {unlisted[0]}, which is not among the files {MARKER} lists "
                "as written by mlet; move it out or choose another output directory"
            )
    return out


def _files_of(directory: Path) -> list[str]:
    """Every file (and symbolic link) under ``directory``, relative, except the marker."""
    found = (p for p in directory.rglob("*") if p.is_symlink() or not p.is_dir())
    return sorted(str(p.relative_to(directory)) for p in found if p.name != MARKER or p.parent != directory)


def _marker(directory: Path) -> dict[str, object]:
    """The marker's fields; empty when there is none or it is not a JSON object."""
    try:
        marker = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def _unlisted(directory: Path) -> list[str]:
    """Files in an output of mlet that its marker does not list (added since); none for a marker without a
    list (a run directory, filled over time, or an output of an earlier version)."""
    listed = _marker(directory).get("files")
    known = set(listed) if isinstance(listed, list) else None
    return [] if known is None else [f for f in _files_of(directory) if f not in known]


def check_location(output: Path | str, inputs: Iterable[Path | str] = ()) -> Path:
    """The refusals that hold whatever the directory holds (root, home, the working directory and its parents,
    a path equal to or containing an input, a path inside a finished output such as a data set or a checkpoint);
    for writers that add files to a directory and never replace it.

        >>> check_location("/tmp/x", inputs=["/tmp/x/results.jsonl"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mlet_torchrec.io.OutputError: refusing to write to /tmp/x: it contains the input /tmp/x/results.jsonl; ...
    """
    out = _resolved(output)
    cwd = _resolved(os.getcwd())
    if out == Path(out.anchor):
        raise OutputError(f"refusing to write to {out} (the file-system root); choose a new directory")
    if out == _resolved(Path.home()):
        raise OutputError(f"refusing to write to {out} (the home directory); choose a new directory")
    if _contains(out, cwd):
        what = "the working directory" if out == cwd else "a parent of the working directory"
        raise OutputError(f"refusing to write to {out} ({what}); choose a new directory")
    for given in inputs:
        src = _resolved(given)
        if _contains(out, src):
            raise OutputError(
                f"refusing to write to {out}: it {'is' if out == src else 'contains'} the input "
                f"{src}; choose another output directory"
            )
    parent = next(p for p in out.parents if p.exists())  # the deepest that exists (the root always does)
    if not parent.is_dir():
        raise OutputError(f"cannot write {out}: {parent} is not a directory")
    finished = next((p for p in out.parents if "files" in _marker(p)), None)  # a data set, checkpoint, export...
    if finished is not None:
        raise OutputError(
            f"refusing to write to {out}: it is inside {finished}, an output of `{output_command(finished)}` that "
            "holds only what it wrote; choose another place"
        )
    return out


def _marker_text(command: str, files: list[str] | None = None) -> str:
    marker: dict[str, object] = {
        "command": command,
        "version": package_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if files is not None:  # what --overwrite may replace (see check_output_path)
        marker["files"] = files
    return json.dumps(marker, indent=2) + "\n"


def claim_directory(path: Path | str, command: str, inputs: Sequence[Path | str] = ()) -> Path:
    """A directory ``mlet`` fills in place over time (a training run): created with the marker, or
    reused if it already carries it; returns the resolved path.

    Refused like :func:`check_output_path` (root, home, the working directory and its parents, a path
    equal to or containing an input), when it holds files without the marker, and when it is a finished
    output (its marker lists its files: an export, a checkpoint) or another command's.

        >>> import tempfile, pathlib
        >>> run = claim_directory(pathlib.Path(tempfile.mkdtemp()) / "run", command="doctest")
        >>> is_ours(run)
        True
    """
    out = check_output_path(path, inputs, overwrite=True)
    marker = _marker(out)
    if marker and (output_command(out) != _verb(command) or "files" in marker):
        raise OutputError(
            f"refusing to use {out}: it is a finished output of `{output_command(out)}`, not a directory "
            f"`{_verb(command)}` fills; choose another directory"
        )
    out.mkdir(parents=True, exist_ok=True)
    if not is_ours(out):
        atomic_write_text(out / MARKER, _marker_text(command))
    return out


def _verb(command: object) -> str:
    """A marker's command as the user typed it: ``mlet export``, ``mlet train``."""
    text = str(command)
    return text if text.startswith("mlet ") else f"mlet {text}"


def output_command(path: Path | str) -> str | None:
    """The command whose output ``path`` is, as typed (``mlet export``), from its marker; None without one."""
    command = _marker(Path(path)).get("command")
    return None if command is None else _verb(command)


def remove_output(path: Path | str) -> bool:
    """Delete a directory ``mlet`` wrote (it carries the marker); False, deleting nothing, otherwise.

    It is first renamed to a hidden sibling, so its name never shows a half-deleted output.
    """
    path = Path(path)
    if path.is_symlink() or not is_ours(path):
        return False
    aside = path.parent / f".{path.name}{OLD_TAG}{new_token()}"
    os.rename(path, aside)
    shutil.rmtree(aside, ignore_errors=True)
    return True


class AtomicOutput:
    """A directory output built in a hidden sibling and committed by rename.

    Multi-process writers agree on one ``token`` (e.g. broadcast by rank 0) so that every rank writes
    into the same temporary directory; only one process calls :meth:`commit`.
    """

    def __init__(
        self,
        output: Path | str,
        command: str,
        inputs: Sequence[Path | str] = (),
        overwrite: bool = False,
        token: str | None = None,
    ) -> None:
        self.output = check_output_path(output, inputs, overwrite)
        self.command, self.overwrite = command, overwrite
        self.token = token or new_token()
        self.tmp = self.output.parent / f".{self.output.name}{TMP_TAG}{self.token}"
        self._made: list[Path] = []  # parent directories begin() created, deepest first

    def begin(self) -> Path:
        """Create the temporary directory (idempotent) and return it."""
        parent = self.output.parent
        while not parent.exists():
            self._made.append(parent)
            parent = parent.parent
        self.output.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(self.output)
        self.tmp.mkdir(exist_ok=True)
        return self.tmp

    def commit(self) -> Path:
        """Write the marker and move the temporary directory into place."""
        atomic_write_text(self.tmp / MARKER, _marker_text(self.command, _files_of(self.tmp)))
        out = self.output
        if out.is_dir() and any(out.iterdir()):
            if not is_ours(out):  # appeared after the check: never replace foreign files
                raise OutputError(f"refusing to replace {out}: it holds files mlet did not write")
            if not self.overwrite:  # another job wrote it while this one ran
                raise OutputError(f"{out} was written by another job while this one ran; --overwrite replaces it")
            if exchange(self.tmp, out):
                shutil.rmtree(self.tmp, ignore_errors=True)  # now holds the old output
            else:  # no atomic exchange on this file system: a short window with the old one aside
                old = out.parent / f".{out.name}{OLD_TAG}{self.token}"
                os.rename(out, old)
                os.rename(self.tmp, out)
                shutil.rmtree(old, ignore_errors=True)
        else:
            if out.is_dir():
                out.rmdir()  # empty: rename cannot replace a directory that vanished or is non-empty
            os.rename(self.tmp, out)
        fsync_dir(out.parent)
        return out

    def abort(self) -> None:
        """Remove the temporary directory and the parents made for it: a failed write leaves nothing."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        for d in self._made:
            try:
                d.rmdir()  # only if still empty: another writer may have put something there
            except OSError:
                break


class AtomicFile:
    """A one-file output (e.g. ``predictions.parquet``) built in a hidden temporary directory beside it
    (shared by the ranks of a job through one ``token``, like :class:`AtomicOutput`) and moved into place
    by one rename, so readers see the old file or the complete new one.

    A file has no marker: ``ours(path)`` says whether an existing file is one this command wrote (e.g.
    from the file's own metadata); only such a file is replaced, and only with ``overwrite``.
    """

    def __init__(
        self,
        output: Path | str,
        ours: Callable[[Path], bool],
        inputs: Sequence[Path | str] = (),
        overwrite: bool = False,
        token: str | None = None,
    ) -> None:
        out = check_location(output, inputs)
        if out.is_symlink() or out.is_dir():
            raise OutputError(f"refusing to write to {out}: it exists and is not a file")
        if out.exists():
            if not ours(out):
                raise OutputError(f"refusing to replace {out}: mlet did not write it; choose another output file")
            if not overwrite:
                raise OutputError(f"{out} exists; pass --overwrite to replace it")
        self.output, self.ours, self.overwrite = out, ours, overwrite
        self.token = token or new_token()
        self.tmp = out.parent / f".{out.name}{TMP_TAG}{self.token}"

    def begin(self) -> Path:
        """Create the temporary directory (idempotent) and return it."""
        self.output.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(self.output)
        self.tmp.mkdir(exist_ok=True)
        return self.tmp

    @property
    def built(self) -> Path:
        """Where the file is written before :meth:`commit`: inside the temporary directory, under the output's name."""
        return self.tmp / self.output.name

    def commit(self) -> Path:
        """Move :attr:`built` over the output; remove the temporary directory. A file that appeared at the output
        while this one was built is replaced only if this command wrote it and ``overwrite`` was given."""
        out = self.output
        if out.is_symlink() or out.exists():
            if out.is_symlink() or not out.is_file() or not self.ours(out):
                raise OutputError(
                    f"refusing to replace {out}: it appeared while this job ran and mlet did not write it"
                )
            if not self.overwrite:
                raise OutputError(f"{out} was written by another job while this one ran; --overwrite replaces it")
        fsync_file(self.built)
        os.replace(self.built, out)
        fsync_dir(self.output.parent)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return self.output

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class Ranks(Protocol):
    """The ranks of a job writing one output together (:mod:`mlet_torchrec.ranks` is the job's)."""

    def is_main(self) -> bool: ...

    def barrier(self) -> None: ...

    def from_main(self, value: T) -> T: ...


def write_failure(e: BaseException, output: Path | str) -> OutputError | None:
    """The one-line error for a write of ``output`` (built in a temporary sibling) that failed with ``e``: an
    ``OSError`` (a full disk, a read-only place, a name too long), or any failure while the file system holding
    ``output`` is full (a library's own message for it); None when ``e`` is something else: the user's own
    mistake (already one line), an interrupt, or a failure with room to spare."""
    if isinstance(e, UserError | KeyboardInterrupt | SystemExit | GeneratorExit):
        return None
    if isinstance(e, OSError):
        return OutputError(describe_os_error(e, output))
    note = full_disk_note(Path(output).parent)
    return OutputError(f"no space left on the device while writing {output}{note}") if note else None


class _Staged(Protocol):
    """An output built in a temporary directory and committed by rename (:class:`AtomicOutput`, :class:`AtomicFile`)."""

    output: Path
    tmp: Path

    def begin(self) -> Path: ...

    def commit(self) -> Path: ...

    def abort(self) -> None: ...


@contextlib.contextmanager
def _staged(out: _Staged, ranks: Ranks | None) -> Iterator[None]:
    """The protocol every rank of a job follows around ``out``'s ``with`` block: rank 0 creates the temporary
    directory before any rank's block starts, commits once every rank's block has ended, and every rank leaves
    after that; on a failure rank 0 removes the temporary directory, and a full disk or a read-only place is one
    line (:func:`write_failure`) on the ranks that failed."""
    main = ranks is None or ranks.is_main()
    try:
        if main:
            out.begin()
        _barrier(ranks)  # the temporary directory exists before any rank writes into it
        yield
        _barrier(ranks)  # every rank has written its part
        if main:
            out.commit()
        _barrier(ranks)
    except BaseException as e:  # DCP's CheckpointException is a BaseException too
        failure = write_failure(e, out.output)  # before abort removes the directories begin() made
        if main:
            out.abort()
        if failure is not None:
            raise failure from e
        raise


@contextlib.contextmanager
def atomic_output(
    output: Path | str,
    command: str,
    inputs: Sequence[Path | str] = (),
    overwrite: bool = False,
    ranks: Ranks | None = None,
) -> Iterator[Path]:
    """:class:`AtomicOutput` as a ``with`` block: yields the temporary directory to fill.

    On any exception the temporary directory is removed and the old output (if any) is untouched; a full disk
    or a permission error becomes a one-line :class:`OutputError` (:func:`write_failure`). With ``ranks`` every
    rank of a job enters the block alike and writes into one temporary directory (rank 0's), which exists before
    any rank's block starts; rank 0 commits once every rank's block has ended, and every rank leaves after that.
    """
    out = AtomicOutput(output, command, inputs, overwrite, token=_shared_token(ranks))
    with _staged(out, ranks):
        yield out.tmp


@contextlib.contextmanager
def atomic_file(
    output: Path | str,
    ours: Callable[[Path], bool],
    inputs: Sequence[Path | str] = (),
    overwrite: bool = False,
    ranks: Ranks | None = None,
) -> Iterator[Path]:
    """:class:`AtomicFile` as a ``with`` block, with :func:`atomic_output`'s failures and ranks: yields the path to
    write the file at (:attr:`AtomicFile.built`); its directory, shared by the ranks, may hold their parts.

        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "scores.txt"
        >>> with atomic_file(out, ours=lambda path: False) as built:
        ...     _ = built.write_text("0.5")
        >>> out.read_text(), sorted(p.name for p in out.parent.iterdir())
        ('0.5', ['scores.txt'])
    """
    out = AtomicFile(output, ours, inputs, overwrite, token=_shared_token(ranks))
    with _staged(out, ranks):
        yield out.built


def _shared_token(ranks: Ranks | None) -> str | None:
    """Rank 0's token on every rank of a job, so they all write into one temporary directory (None alone)."""
    return None if ranks is None else ranks.from_main(new_token())


def _barrier(ranks: Ranks | None) -> None:
    if ranks is not None:
        ranks.barrier()


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write a file completely or not at all: a temporary sibling, fsync, then rename over ``path``."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """:func:`atomic_write_text` for bytes (images, binary files)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_TAG}{new_token()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
