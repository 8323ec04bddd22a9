"""Checkpoints: torch.distributed.checkpoint (DCP) of the sharded model and both optimizers, plus
everything else an exact resume needs.

Layout of one checkpoint::

    RUN_DIR/checkpoints/step_00001234/
        .metadata, __0_0.distcp, ...   # DCP: model (sharded W1, replicated W2/MLPs) and the
                                       # CombinedOptimizer state (fused W1 optimizer + dense one)
        rank_00000.pt, ...             # per rank: RNG states (torch, CUDA, numpy, random)
        checkpoint.json                # step, data position, world size, plan, data set shape, metrics
        config.yaml                    # the resolved run config
    RUN_DIR/checkpoints/LATEST         # name of the newest complete checkpoint (advisory)

Atomic: a checkpoint is written into ``step_N.tmp``; once every rank reports success, rank 0 renames
it into place. The rename is the commit: a directory named ``step_N`` (no suffix) is complete, so a
process killed mid-write, or a write that fails (disk full), leaves the previous checkpoints intact and
only a ``.tmp`` directory behind (deleted on failure, or by the next run). ``keep`` limits how many
complete checkpoints are kept (oldest deleted after a commit).

Every rank learns about every failure (``CheckpointError`` on all ranks, naming the rank and the cause),
so no rank is left waiting in a collective. DCP reshards on load: a checkpoint loads at any world size
and sharding plan (optimizer state included), and into a plain unsharded model in a single process.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from mlet_torchrec.config import ExperimentConfig

log = logging.getLogger("mlet.checkpoint")

CHECKPOINT_META = "checkpoint.json"
LATEST = "LATEST"
DCP_METADATA = ".metadata"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names it, the cause and what is intact."""


def checkpoint_root(run_dir: Path | str) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_state_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _is_main() -> bool:
    return _world()[0] == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def agree(error: Optional[str]) -> Optional[str]:
    """Collective: the first error any rank reports (prefixed with its rank), or None everywhere."""
    rank, world = _world()
    if world == 1:
        return error
    errors: List[Optional[str]] = [None] * world
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
        return "; ".join(parts) or str(e.args[0] if e.args else e)
    return f"{type(e).__name__}: {e}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def complete_checkpoints(run_dir_or_root: Path | str) -> List[Path]:
    """Complete checkpoints (committed ``step_N`` directories with their metadata), oldest first."""
    root = Path(run_dir_or_root)
    if root.name != "checkpoints" and (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and (child / CHECKPOINT_META).is_file() and (child / DCP_METADATA).is_file():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path | str) -> Optional[Path]:
    """The newest complete checkpoint of a run directory, or None. Does not trust ``LATEST`` alone:
    a crash between the commit rename and the ``LATEST`` update still finds the newest one."""
    found = complete_checkpoints(checkpoint_root(run_dir))
    return found[-1] if found else None


def remove_incomplete(run_dir: Path | str) -> List[Path]:
    """Delete leftovers of interrupted writes (``*.tmp``, ``*.old``); rank 0 only, before training."""
    root = checkpoint_root(run_dir)
    removed = []
    if root.is_dir():
        for child in root.iterdir():
            if child.is_dir() and (child.name.endswith(".tmp") or child.name.endswith(".old")):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


def _rotate(root: Path, keep: int, protect: Path) -> None:
    for old in complete_checkpoints(root)[:-keep]:
        if old != protect:
            shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    config: ExperimentConfig,
    info: Dict[str, Any],
    optimizer: Optional[Any] = None,
    rank_state: Optional[Dict[str, Any]] = None,
    keep: Optional[int] = None,
) -> Path:
    """Collective: every rank calls this. Returns the committed checkpoint directory.

    ``rank_state`` (per rank, e.g. RNG states) is saved as ``rank_NNNNN.pt``; ``keep`` deletes all but
    the newest ``keep`` complete checkpoints after the commit. On any rank's failure every rank raises
    ``CheckpointError`` and the temporary directory is removed; earlier checkpoints are untouched.
    """
    rank, world = _world()
    root = checkpoint_root(run_dir)
    final = root / checkpoint_name(step)
    tmp = root / f"{final.name}.tmp"
    previous = latest_checkpoint(run_dir)

    def fail(err: str) -> CheckpointError:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        intact = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        return CheckpointError(f"could not write checkpoint {final} (step {step}): {err}; {intact}")

    err: Optional[str] = None
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as e:
            err = describe_exception(e)
    err = agree(err)
    if err:
        raise fail(err)

    try:
        state: Dict[str, Any] = {"model": model.state_dict()}
        if optimizer is not None:
            state["optimizer"] = optimizer.state_dict()
        dcp.save(state, checkpoint_id=str(tmp))
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        err = describe_exception(e)
    if err is None and rank_state is not None:
        try:
            torch.save({"rank": rank, "world_size": world, **rank_state}, tmp / rank_state_file(rank))
        except (OSError, RuntimeError) as e:
            err = describe_exception(e)
    if err is None and rank == 0:
        try:
            config.save(tmp / "config.yaml")
            meta = {"step": step, "world_size": world, **info}
            _write_text(tmp / CHECKPOINT_META, json.dumps(meta, indent=2, default=str))
        except OSError as e:
            err = describe_exception(e)
    err = agree(err)
    if err:
        raise fail(err)

    if rank == 0:  # commit
        try:
            old = None
            if final.exists():  # re-saving a step: keep the old one until the new one is in place
                old = final.with_name(final.name + ".old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(root)
        except OSError as e:
            err = describe_exception(e)
        if err is None:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            try:  # advisory pointer; a failure here does not undo the commit
                latest_tmp = root / f".{LATEST}.tmp"
                _write_text(latest_tmp, final.name + "\n")
                os.replace(latest_tmp, root / LATEST)
            except OSError as e:
                log.warning("checkpoint %s committed but %s not updated: %s", final, LATEST, e)
            if keep is not None:
                _rotate(root, keep, protect=final)
    err = agree(err)
    if err:
        raise fail(err)
    return final


def resolve_checkpoint(path: Path | str) -> Path:
    """A checkpoint directory from itself, its run directory or its ``checkpoints`` folder."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / CHECKPOINT_META).is_file():
            return candidate
        if (candidate / LATEST).is_file():
            named = candidate / (candidate / LATEST).read_text().strip()
            if (named / CHECKPOINT_META).is_file():
                return named
        found = complete_checkpoints(candidate)
        if found:
            return found[-1]
    raise FileNotFoundError(
        f"{path}: not a checkpoint (no {CHECKPOINT_META}) nor a run directory with complete checkpoints"
    )


def read_checkpoint_info(checkpoint: Path) -> Dict[str, Any]:
    return json.loads((Path(checkpoint) / CHECKPOINT_META).read_text())


def read_rank_state(checkpoint: Path, rank: int) -> Optional[Dict[str, Any]]:
    """This rank's saved state (RNG states), or None when the checkpoint has none for ``rank``."""
    path = Path(checkpoint) / rank_state_file(rank)
    if not path.is_file():
        return None
    return torch.load(path, weights_only=True)


def load_model_state(checkpoint: Path, model: nn.Module) -> None:
    """Load the checkpoint's model weights into ``model`` (sharded or plain; DCP reshards)."""
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(checkpoint))
    model.load_state_dict(state["model"])


def load_training_state(checkpoint: Path, model: nn.Module, optimizer: Any) -> None:
    """Collective: model weights and the (fused + dense) optimizer state, resharded to this job's plan.

    ``optimizer`` must already hold a state entry for every parameter (TorchRec's ``KeyedOptimizer``
    loads in place; see ``train_state.init_optimizer_state``).
    """
    try:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        dcp.load(state, checkpoint_id=str(checkpoint))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (Exception, CheckpointException) as e:
        raise CheckpointError(
            f"could not load checkpoint {checkpoint}: {describe_exception(e)}; delete it to resume from the one "
            "before, or set run.resume=false to start over"
        ) from None
