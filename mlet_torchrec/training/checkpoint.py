"""Checkpoints: torch.distributed.checkpoint (DCP) of the sharded model and both optimizers, plus
everything else an exact resume needs.

Layout of one checkpoint::

    RUN_DIR/checkpoints/step_00001234/
        .metadata, __0_0.distcp, ...   # DCP: model (sharded W1, replicated W2/MLPs), the
                                       # CombinedOptimizer state (fused W1 optimizer + dense one),
                                       # train_state (step), data_position, rng_rank_NNNNN (per rank)
        checkpoint.json                # step, world size, plan, data set shape, metrics (for readers)
        config.yaml                    # the resolved run config
        .mlet-output.json              # mlet's output marker (mlet_torchrec.io)
    RUN_DIR/checkpoints/LATEST         # name of the newest complete checkpoint (advisory)

Atomic, through :class:`mlet_torchrec.io.AtomicOutput`: every rank writes into the same hidden
temporary sibling (``.step_N.mlet-tmp-<pid>-<hex>``, its name broadcast by rank 0); once every rank
reports success, rank 0 commits it by rename (an atomic exchange when the step is saved again). A
directory named ``step_N`` is complete, so a process killed mid-write, or a write that fails (disk
full), leaves the previous checkpoints intact and at most a hidden temporary behind (removed on
failure, or by the next run). Each checkpoint carries the io marker; ``keep`` limits how many complete
checkpoints are kept (the oldest marked ones are deleted after a commit).

Asynchronous checkpoints (``train.async_checkpoint``, :func:`start_checkpoint` with a gloo group):
every tensor is copied at the step, DCP ``async_save`` writes the copy into the temporary in the
background, and :meth:`PendingCheckpoint.finish` (at the next checkpoint or the end) commits it only
after the write has completed on every rank; a failing run drops it, so it never becomes visible.

Every rank learns about every failure (``CheckpointError`` on all ranks, naming the rank and the cause),
so no rank is left waiting in a collective. DCP reshards on load: a checkpoint loads at any world size
and sharding plan (optimizer state included), and into a plain unsharded model in a single process.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from mlet_torchrec import ranks
from mlet_torchrec.config import ExperimentConfig
from mlet_torchrec.errors import UserError
from mlet_torchrec.files import full_disk_note, sha256_file
from mlet_torchrec.io import MARKER, AtomicOutput, atomic_write_text, is_ours, output_command, remove_output
from mlet_torchrec.stale import sweep_stale_in
from mlet_torchrec.training import safe_dcp
from mlet_torchrec.training.locks import unless_pinned
from mlet_torchrec.training.safe_dcp import DCP_METADATA, METADATA_SHA256, UnsafeCheckpoint
from mlet_torchrec.training.staging import CopyStager

log = logging.getLogger("mlet.checkpoint")

CHECKPOINT_META = "checkpoint.json"
TRAIN_COMMAND = "mlet train"
"""The command named in the marker of a run directory and its checkpoints."""
LATEST = "LATEST"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


class CheckpointError(UserError):
    """A checkpoint could not be written or read (corrupt, truncated, from another model, disk full);
    the message, one line, names it, the cause and what is intact."""


def checkpoint_root(run_dir: Path | str) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def agree(error: str | None) -> str | None:
    """Collective: the first error any rank reports (prefixed with its rank), or None everywhere."""
    rank, world = ranks.world()
    if world == 1:
        return error
    errors: list[str | None] = [None] * world
    dist.all_gather_object(errors, error)
    for r, e in enumerate(errors):
        if e:
            return e if e.startswith("rank ") else f"rank {r}: {e}"
    return None


def describe_exception(e: BaseException) -> str:
    """One line for an exception; DCP's CheckpointException is unwrapped to each rank's root cause."""
    if isinstance(e, CheckpointException):
        parts = []
        for rank, (exc, _trace) in sorted(e.failures.items()):
            parts.append(f"rank {rank}: {describe_exception(exc)}")
        return "; ".join(parts) or _one_line(str(e.args[0] if e.args else e))
    return _one_line(f"{type(e).__name__}: {e}")


def _one_line(text: str, limit: int = 600) -> str:
    """Messages of torch (e.g. load_state_dict's) span lines: ours are one line, and not a page long."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _root_of(run_dir_or_root: Path | str) -> Path:
    root = Path(run_dir_or_root)
    if root.name != "checkpoints" and (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    return root


def committed_checkpoints(run_dir_or_root: Path | str) -> list[Path]:
    """Every committed ``step_N`` directory, oldest first, whole or damaged since."""
    root = _root_of(run_dir_or_root)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), child) for child in root.iterdir() if (m := _STEP_DIR.match(child.name)) and child.is_dir()
    ]
    return [p for _, p in sorted(found)]


def complete_checkpoints(run_dir_or_root: Path | str) -> list[Path]:
    """Complete checkpoints (committed ``step_N`` directories with their metadata), oldest first."""
    return [
        p
        for p in committed_checkpoints(run_dir_or_root)
        if (p / CHECKPOINT_META).is_file() and (p / DCP_METADATA).is_file()
    ]


def latest_checkpoint(run_dir: Path | str) -> Path | None:
    """The newest committed checkpoint of a run directory, checked (:func:`check_checkpoint`), or None.

    Does not trust ``LATEST``: a crash between the commit and the ``LATEST`` update still finds the
    newest one. A damaged newest checkpoint raises ``CheckpointError`` rather than silently resuming
    from an older one.
    """
    found = committed_checkpoints(checkpoint_root(run_dir))
    if not found:
        return None
    check_checkpoint(found[-1], older=found[-2] if len(found) > 1 else None)
    return found[-1]


def _damaged(checkpoint: Path, what: str, older: Path | None) -> CheckpointError:
    fallback = f"delete it to use the one before ({older.name})" if older else "delete it"
    return CheckpointError(
        f"checkpoint {checkpoint} is damaged: {_one_line(what)}; {fallback}, or set "
        "run.resume=false (training) to start over"
    )


def check_checkpoint(checkpoint: Path | str, older: Path | None = None) -> dict[str, Any]:
    """Check a checkpoint's files without loading its tensors; returns its ``checkpoint.json``.

    Catches a missing or garbled ``checkpoint.json`` or DCP ``.metadata`` and data files that are
    missing or shorter than the metadata says (truncated). Raises ``CheckpointError`` naming the file.
    """
    path = Path(checkpoint)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    try:
        info = json.loads((path / CHECKPOINT_META).read_text())
        if not isinstance(info, dict) or not isinstance(info.get("step"), int):
            raise ValueError("no step number")
    except FileNotFoundError:
        raise _damaged(path, f"{CHECKPOINT_META} is missing", older) from None
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _damaged(path, f"{CHECKPOINT_META} is unreadable ({e})", older) from None
    if not (path / DCP_METADATA).is_file():
        raise _damaged(path, f"its DCP metadata file {DCP_METADATA} is missing", older)
    try:
        metadata = safe_dcp.read_metadata(path)
    except UnsafeCheckpoint as e:
        raise _damaged(path, str(e), older) from None
    recorded = info.get(METADATA_SHA256)
    if recorded is not None and recorded != sha256_file(path / DCP_METADATA):
        raise _damaged(path, f"its {DCP_METADATA} does not match the SHA-256 recorded in {CHECKPOINT_META}", older)
    needed: dict[str, int] = {}
    for item in (metadata.storage_data or {}).values():
        needed[item.relative_path] = max(needed.get(item.relative_path, 0), item.offset + item.length)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            raise _damaged(path, f"data file {name} is missing", older)
        if file.stat().st_size < size:
            raise _damaged(path, f"data file {name} is truncated ({file.stat().st_size} of {size} bytes)", older)
    return info


def saved_entries(checkpoint: Path | str) -> set[str]:
    """The top-level names a checkpoint holds (``model``, ``optimizer``, ``rng_rank_00001``, ...)."""
    try:
        metadata = safe_dcp.read_metadata(checkpoint)
    except UnsafeCheckpoint as e:
        raise _damaged(Path(checkpoint), str(e), None) from None
    return {key.split(".", 1)[0] for key in metadata.state_dict_metadata}


def remove_incomplete(run_dir: Path | str) -> list[Path]:
    """Delete the hidden temporaries of interrupted checkpoint writes; rank 0 only, before training
    (the job is then the run directory's only writer, whichever machine the killed one ran on)."""
    return sweep_stale_in(checkpoint_root(run_dir), any_pid=True)


def remove_checkpoints(run_dir: Path | str) -> list[Path]:
    """Delete a run directory's checkpoints (``run.resume=false``); rank 0 only. Only those that carry
    mlet's marker: raises ``CheckpointError``, deleting nothing, if another one is there."""
    root = checkpoint_root(run_dir)
    foreign = [p for p in committed_checkpoints(root) if not is_ours(p)]
    if foreign:
        raise CheckpointError(
            f"run.resume=false would delete {foreign[0]}, which lacks mlet's marker "
            f"({MARKER}); delete it yourself or choose a new run.dir"
        )
    removed = [p for p in committed_checkpoints(root) if remove_output(p)]
    removed += sweep_stale_in(root, any_pid=True)
    if (root / LATEST).is_file():
        (root / LATEST).unlink()
    return removed


def _rotate(root: Path, keep: int, protect: Path) -> None:
    for old in complete_checkpoints(root)[:-keep]:
        with unless_pinned(old) as free:  # a reader (collapse, evaluate) pins the one it reads
            if old != protect and free and not remove_output(old):
                log.warning("not deleting %s (keep_checkpoints=%d): it lacks mlet's marker", old, keep)


def save_checkpoint(
    run_dir: Path,
    step: int,
    states: Mapping[str, Any],
    config: ExperimentConfig,
    info: dict[str, Any],
    keep: int | None = None,
) -> Path:
    """Collective: every rank calls this. Returns the committed checkpoint directory.

    ``states`` maps names to ``Stateful`` objects (a model, an optimizer, :mod:`.state`'s) or state
    dicts; each rank may add entries of its own (``rng_rank_NNNNN``). ``keep`` deletes all but the newest
    ``keep`` complete checkpoints after the commit. On any rank's failure every rank raises
    ``CheckpointError`` and the temporary directory is removed; earlier checkpoints are untouched.
    """
    return start_checkpoint(run_dir, step, states, config, info, keep).finish()


def start_checkpoint(
    run_dir: Path,
    step: int,
    states: Mapping[str, Any],
    config: ExperimentConfig,
    info: dict[str, Any],
    keep: int | None = None,
    async_group: Any | None = None,
) -> PendingCheckpoint:
    """Collective: write a checkpoint into its hidden temporary; :meth:`PendingCheckpoint.finish` commits it.

    With ``async_group`` (a gloo process group of all ranks, kept apart from training's collectives)
    the tensors are staged (copied) now and written in the background by DCP ``async_save``; training
    may change the weights meanwhile. The checkpoint becomes visible only in ``finish``, once every
    rank's write has completed.
    """
    rank, _ = ranks.world()
    root = checkpoint_root(run_dir)
    existing = complete_checkpoints(root)  # for messages only: no full check
    pending = PendingCheckpoint(root, checkpoint_name(step), step, keep, existing[-1] if existing else None)
    err: str | None = None
    tmp_name: str | None = None
    if rank == 0:
        try:
            pending.out = AtomicOutput(pending.final, command=TRAIN_COMMAND, overwrite=True)
            tmp_name = str(pending.out.begin())
        except (OSError, UserError) as e:
            err = describe_exception(e)
    tmp_name, err = ranks.from_main((tmp_name, err))
    if err or tmp_name is None:
        raise pending.fail(err or "no temporary directory")
    tmp = pending.tmp = Path(tmp_name)

    try:
        if async_group is None:
            dcp.save(dict(states), checkpoint_id=str(tmp))
        else:
            response = dcp.async_save(
                dict(states), checkpoint_id=str(tmp), process_group=async_group, async_stager=CopyStager()
            )
            pending.future = getattr(response, "upload_completion", response)
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        err = describe_exception(e)
    if err is None and rank == 0:
        try:
            config.save(tmp / "config.yaml")
            meta = {"step": step, "world_size": ranks.world()[1], **info}
            atomic_write_text(tmp / CHECKPOINT_META, json.dumps(meta, indent=2, default=str))
        except OSError as e:
            err = describe_exception(e)
    pending.error = err
    return pending


class PendingCheckpoint:
    """A checkpoint written (or being written) into its temporary directory, not yet visible."""

    def __init__(self, root: Path, name: str, step: int, keep: int | None, previous: Path | None) -> None:
        self.root, self.final, self.step, self.keep, self.previous = root, root / name, step, keep, previous
        self.out: AtomicOutput | None = None  # rank 0's handle on the temporary directory
        self.tmp: Path | None = None
        self.future: Any | None = None  # DCP async_save's, when written in the background
        self.error: str | None = None

    def fail(self, err: str) -> CheckpointError:
        if self.out is not None:
            self.out.abort()
        ranks.barrier()
        intact = (
            f"the previous checkpoint {self.previous} is intact" if self.previous else "no earlier checkpoint exists"
        )
        return CheckpointError(f"could not write checkpoint {self.final} (step {self.step}): {err}; {intact}")

    def _wait(self) -> str | None:
        if self.future is None:
            return None
        try:
            self.future.result()
        except (Exception, CheckpointException) as e:
            return describe_exception(e)
        finally:
            self.future = None
        return None

    def finish(self) -> Path:
        """Collective: wait for this rank's write, agree that every rank's is complete, commit (rank 0)."""
        err = self.error or self._wait()
        if err is not None and self.tmp is not None:
            err += full_disk_note(self.tmp.parent)
        err = agree(err)
        if err:
            raise self.fail(err)
        if self.out is not None:  # rank 0 commits what every rank agreed is complete
            try:
                safe_dcp.record_sha256(self.out.tmp, CHECKPOINT_META)
                self.out.commit()
            except (OSError, UserError) as e:
                err = describe_exception(e)
            if err is None:
                try:  # advisory pointer; a failure here does not undo the commit
                    atomic_write_text(self.root / LATEST, self.final.name + "\n")
                except OSError as e:
                    log.warning("checkpoint %s committed but %s not updated: %s", self.final, LATEST, e)
                if self.keep is not None:
                    _rotate(self.root, self.keep, protect=self.final)
        err = agree(err)
        if err:
            raise self.fail(err)
        return self.final

    def abandon(self) -> None:
        """Not collective (the run is failing): let the background write end, then drop the temporary."""
        self._wait()
        if self.out is not None:
            self.out.abort()


def resolve_checkpoint(path: Path | str) -> Path:
    """A checkpoint directory from itself, its run directory or its ``checkpoints`` folder, checked
    (:func:`check_checkpoint`). Raises ``CheckpointError`` if there is none or it is damaged."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    made_by = output_command(path)
    if made_by not in (None, TRAIN_COMMAND):
        raise CheckpointError(f"{path}: an output of `{made_by}`, not a training checkpoint or run directory")
    if _STEP_DIR.match(path.name) or (path / CHECKPOINT_META).exists() or (path / DCP_METADATA).exists():
        check_checkpoint(path)
        return path
    found = committed_checkpoints(path)
    if not found:
        raise CheckpointError(f"{path}: not a checkpoint (no {CHECKPOINT_META}) nor a run directory with checkpoints")
    check_checkpoint(found[-1], older=found[-2] if len(found) > 1 else None)
    return found[-1]


def read_checkpoint_info(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's ``checkpoint.json`` (step, data position, plan, ...); ``CheckpointError`` if damaged."""
    return check_checkpoint(checkpoint)


def load_dcp(checkpoint: Path | str, state: dict[str, Any], no_dist: bool = False) -> None:
    """``dcp.load`` of ``state`` (filled in place) from a checkpoint; collective unless ``no_dist``.

    A damaged checkpoint, or one of another model (missing keys, other shapes), raises a one-line
    ``CheckpointError`` (on every rank of a job) instead of DCP's multi-rank traceback.
    """
    try:
        safe_dcp.load(state, checkpoint, no_dist=no_dist)
    except (Exception, CheckpointException) as e:
        raise CheckpointError(
            f"could not load checkpoint {checkpoint}: {describe_exception(e)} (damaged, or "
            "written by another model or configuration)"
        ) from None


def load_model_state(checkpoint: Path, model: nn.Module, no_dist: bool = False) -> None:
    """Load the checkpoint's model weights into ``model`` (sharded or plain; DCP reshards); collective unless
    ``no_dist`` (a whole model read by this process alone).

    Raises ``CheckpointError`` (on every rank of a job) if the files are damaged or hold another model.
    """
    state = {"model": model.state_dict()}
    load_dcp(checkpoint, state, no_dist=no_dist)
    try:
        model.load_state_dict(state["model"])
    except Exception as e:  # noqa: BLE001 - keys or shapes of another model
        raise CheckpointError(
            f"could not load checkpoint {checkpoint}: {describe_exception(e)} (written by "
            "another model or configuration)"
        ) from None


def load_states(checkpoint: Path, states: Mapping[str, Any]) -> None:
    """Collective: load ``states`` (``Stateful`` objects, in place) from a checkpoint, resharded to this
    job's plan; a checkpoint may hold more entries than asked for.

    An optimizer must already hold a state entry for every parameter (TorchRec's ``KeyedOptimizer``
    loads in place; see ``state.init_optimizer_state``).
    """
    try:
        safe_dcp.load(dict(states), checkpoint)
    except (Exception, CheckpointException) as e:
        raise CheckpointError(
            f"could not load checkpoint {checkpoint}: {describe_exception(e)}; delete it to resume from the one "
            "before, or set run.resume=false to start over"
        ) from None
