"""Checkpoints: torch.distributed.checkpoint (DCP) of the sharded model, plus config and plan.

Layout of one checkpoint::

    RUN_DIR/checkpoints/step_00001234/
        .metadata, __0_0.distcp, ...   # DCP: every rank writes its own shards
        checkpoint.json                # step, world size, sharding plan, data set, metrics
        config.yaml                    # the resolved run config

A checkpoint is written into ``step_N.tmp`` and renamed into place by rank 0 only once every
rank has finished, so a crash mid-write leaves the previous checkpoint intact. ``LATEST`` names
the newest complete one. DCP reshards on load: a checkpoint loads at any world size and plan,
and into a plain unsharded model in a single process.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from mlet_torchrec.config import ExperimentConfig

CHECKPOINT_META = "checkpoint.json"
LATEST = "LATEST"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    config: ExperimentConfig,
    info: Dict[str, Any],
    optimizer: Optional[Any] = None,
) -> Path:
    """Collective: every rank calls this. Returns the final checkpoint directory."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if _is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    state: Dict[str, Any] = {"model": model.state_dict()}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    dcp.save(state, checkpoint_id=str(tmp))
    if _is_main():
        config.save(tmp / "config.yaml")
        meta = {"step": step, "world_size": dist.get_world_size() if dist.is_initialized() else 1, **info}
        (tmp / CHECKPOINT_META).write_text(json.dumps(meta, indent=2, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = root / f".{LATEST}.tmp"
        latest_tmp.write_text(final.name + "\n")
        os.replace(latest_tmp, root / LATEST)
    _barrier()
    return final


def resolve_checkpoint(path: Path | str) -> Path:
    """A checkpoint directory from itself, its run directory or its ``checkpoints`` folder."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / CHECKPOINT_META).is_file():
            return candidate
        if (candidate / LATEST).is_file():
            return candidate / (candidate / LATEST).read_text().strip()
    raise FileNotFoundError(
        f"{path}: not a checkpoint (no {CHECKPOINT_META}) nor a run directory with checkpoints/{LATEST}"
    )


def read_checkpoint_info(checkpoint: Path) -> Dict[str, Any]:
    return json.loads((Path(checkpoint) / CHECKPOINT_META).read_text())


def load_model_state(checkpoint: Path, model: nn.Module) -> None:
    """Load the checkpoint's model weights into ``model`` (sharded or plain; DCP reshards)."""
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(checkpoint))
    model.load_state_dict(state["model"])
