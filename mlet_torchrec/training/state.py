"""What a run saves besides the model and optimizer, and the checks that a checkpoint can continue it.

Three typed ``Stateful`` objects travel through DCP with the model and the optimizer
(``checkpointer.CheckpointManager``): :class:`TrainState` (step, seconds), :class:`DataPosition` and
:class:`RngState`. All hold tensors only, so loading them unpickles nothing.

Data position. The reader's order is a function of (seed, epoch, global step) and the data only
(data_pipes/order.py): the position after a step is ``(epoch, global batches done in it)``, and a
reader ``set_position`` there yields exactly the batches an uninterrupted run would have, at any
world size and ``data.num_workers`` (only the rows each rank takes of a global batch change with
the world size). Checkpoints also record the reader's ``virtual_shards``; a resume refuses another.

RNG. Each rank saves its torch (and CUDA), numpy and ``random`` states; a resumed rank restores its own
(or, when the world grew and it has none, seeds from (seed, step, rank)). Training itself draws
from the global torch RNG only in the model (dropout); DataLoaders get their own generator.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torchrec.datasets.utils import Batch

from data_pipes.order import reads_fraction
from data_pipes.reader import ParquetBatchReader, make_dataloader
from data_pipes.schema import DatasetMeta
from data_pipes.transform import dataset_identity, ref_identity
from mlet_torchrec.config import ConfigError, ExperimentConfig, load_config
from mlet_torchrec.training.checkpoint import read_checkpoint_info, resolve_checkpoint

log = logging.getLogger("mlet.train")


# ---------------------------------------------------------------------------------------- data position


def dataloader(
    reader: ParquetBatchReader, num_workers: int, seed: int, epoch: int, pin_memory: bool = False
) -> Iterable[Batch]:
    """The reader's batches for one epoch, from its position on, with their own generator: creating
    the DataLoader leaves the global torch RNG alone (a plain one draws its base seed from it).
    ``pin_memory`` (CUDA): batches in page-locked memory, so the TorchRec pipeline's host-to-device
    copies on its side stream are asynchronous."""
    gen = torch.Generator().manual_seed((int(seed) << 20) + int(epoch))
    return make_dataloader(reader, num_workers, generator=gen, pin_memory=pin_memory)


def log_data_order(reader: ParquetBatchReader) -> None:
    """Log what an epoch consumes and drops, and whether this world size reads only its share."""
    rows, used, world = reader.num_rows(), reader.rows_per_epoch(), reader.world_size
    log.info(
        "train split: %d rows; an epoch is %d global batches of %d: %d rows consumed, the last %d of the "
        "epoch's order dropped; %d virtual shards",
        rows,
        reader.num_batches(),
        reader.global_batch_size,
        used,
        rows - used,
        reader.virtual_shards,
    )
    share = reads_fraction(reader.virtual_shards, world)
    if share > 1.0 / world:
        log.warning(
            "%d ranks do not divide the reader's %d virtual shards: the batches are the same as at any "
            "world size, but each rank decodes %.0f%% of the data instead of %.0f%%",
            world,
            reader.virtual_shards,
            100 * share,
            100 / world,
        )


def normalize_position(epoch: int, batches: int, epoch_steps: Sequence[int]) -> tuple[int, int]:
    """``(epoch, batches)`` moved past epochs that are already complete under ``epoch_steps``."""
    while epoch < len(epoch_steps) and batches >= epoch_steps[epoch]:
        epoch, batches = epoch + 1, 0
    return epoch, batches


@dataclass
class DataPosition:
    """``Stateful``: the data position, ``(epoch, global batches the model consumed in it)``.

    ``epoch_steps`` (steps per epoch, not saved) moves a position at the end of an epoch to the start of
    the next when saved or loaded. ``virtual_shards`` is the reader's: a checkpoint read in another
    number of them cannot be continued exactly (:meth:`check_reader`).

    Example:
        >>> pos = DataPosition(virtual_shards=96, epoch_steps=(12, 12))
        >>> pos.batches_in_epoch = 12
        >>> {k: int(v) for k, v in pos.state_dict().items()}
        {'epoch': 1, 'batches_in_epoch': 0, 'virtual_shards': 96}
    """

    epoch: int = 0
    batches_in_epoch: int = 0
    virtual_shards: int = 0
    epoch_steps: Sequence[int] = ()

    def state_dict(self) -> dict[str, torch.Tensor]:
        epoch, batches = normalize_position(self.epoch, self.batches_in_epoch, self.epoch_steps)
        return {
            "epoch": torch.tensor(epoch),
            "batches_in_epoch": torch.tensor(batches),
            "virtual_shards": torch.tensor(self.virtual_shards),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        saved = (int(state["epoch"]), int(state["batches_in_epoch"]))
        self.epoch, self.batches_in_epoch = normalize_position(*saved, self.epoch_steps)
        self.virtual_shards = int(state["virtual_shards"])

    def check_reader(self, checkpoint: str, reader: ParquetBatchReader) -> None:
        """Refuse a loaded position whose data order ``reader`` cannot continue exactly."""
        if self.virtual_shards != reader.virtual_shards:
            raise ConfigError(
                f"checkpoint {checkpoint} read the data in {self.virtual_shards} virtual shards, this reader "
                f"uses {reader.virtual_shards}: resuming would change the data order"
            )


@dataclass
class TrainState:
    """``Stateful``: the optimizer steps taken, the seconds spent taking them (the loop only) and
    ``first_step``, the step a warm start (``run.init_from``) began at (0 for a run from scratch): this
    run's own steps are ``step - first_step``.

    Example:
        >>> state = TrainState(step=7, train_seconds=1.5)
        >>> restored = TrainState()
        >>> restored.load_state_dict(state.state_dict())
        >>> restored
        TrainState(step=7, train_seconds=1.5, first_step=0)
    """

    step: int = 0
    train_seconds: float = 0.0
    first_step: int = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "step": torch.tensor(self.step),
            "train_seconds": torch.tensor(self.train_seconds, dtype=torch.float64),
            "first_step": torch.tensor(self.first_step),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.step, self.train_seconds = int(state["step"]), float(state["train_seconds"])
        self.first_step = int(state["first_step"])


# ---------------------------------------------------------------------------------------------- RNG


class RngState:
    """``Stateful``: this rank's RNG states (torch, the device's CUDA one, numpy, ``random``) as tensors.

    Saved through DCP under :meth:`name` (one entry per rank: the states differ); a rank the checkpoint's
    world did not have seeds from (seed, step, rank) instead (:meth:`reseed`). Loading applies the states.

    Example:
        >>> rng = RngState(rank=0, device=torch.device("cpu"))
        >>> saved = rng.state_dict()
        >>> first = torch.rand(2)
        >>> rng.load_state_dict(saved)
        >>> torch.equal(torch.rand(2), first)
        True
    """

    def __init__(self, rank: int, device: torch.device) -> None:
        self.rank, self.cuda = rank, device.type == "cuda"

    @staticmethod
    def name(rank: int) -> str:
        """The checkpoint entry of ``rank``'s states."""
        return f"rng_rank_{rank:05d}"

    def state_dict(self) -> dict[str, torch.Tensor]:
        # legacy=True: the (name, keys, pos, has_gauss, cached_gaussian) tuple of MT19937
        _, keys, pos, has_gauss, gauss = cast(tuple[Any, ...], np.random.get_state(legacy=True))
        version, words, next_gauss = random.getstate()
        state = {
            "torch": torch.get_rng_state(),
            "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
            "numpy_rest": torch.tensor([pos, has_gauss, gauss], dtype=torch.float64),
            "python_words": torch.tensor(words, dtype=torch.int64),
            "python_rest": torch.tensor([version, next_gauss is not None, next_gauss or 0.0], dtype=torch.float64),
        }
        if self.cuda:
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(state["torch"])
        pos, has_gauss, gauss = state["numpy_rest"].tolist()
        np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
        version, has_next, next_gauss = state["python_rest"].tolist()
        words = tuple(int(w) for w in state["python_words"].tolist())
        random.setstate((int(version), words, next_gauss if has_next else None))
        if self.cuda:
            torch.cuda.set_rng_state(state["cuda"])

    def reseed(self, seed: int, step: int) -> None:
        """Seed every RNG from (seed, step, rank): a rank the checkpoint had no states for."""
        mixed = (int(seed) * 1_000_003 + int(step) * 7919 + int(self.rank)) % (2**32)
        random.seed(mixed)
        np.random.seed(mixed)
        torch.manual_seed(mixed)


# ------------------------------------------------------------------------------------ optimizer state


def init_optimizer_state(optimizer: Any) -> None:
    """Create the lazily-initialised state of every sub-optimizer (e.g. Adam's moments) without
    changing any parameter, so that DCP can load a checkpoint's optimizer state into it in place.

    TorchRec's ``KeyedOptimizer.init_state`` runs one step on zero gradients; with the learning
    rate set to 0 for that step, no parameter moves (weight decay included).
    """
    subs = optimizer.optimizers if hasattr(optimizer, "optimizers") else [("", optimizer)]
    for _, opt in subs:
        if len(opt.state) or not any(p.requires_grad for p in opt.params.values()):
            continue  # already initialised (FBGEMM's fused state is allocated up front)
        lrs = [g.get("lr") for g in opt.param_groups]
        for g in opt.param_groups:
            if "lr" in g:
                g["lr"] = 0.0
        try:
            opt.init_state()
        finally:
            for g, lr in zip(opt.param_groups, lrs, strict=True):
                if lr is not None:
                    g["lr"] = lr
            for p in opt.params.values():
                p.grad = None


# -------------------------------------------------------------------------------- run compatibility

# Keys a resumed run may change: how it runs, not what it trains.
_MAY_CHANGE = {
    "data.path",
    "data.num_workers",
    "data.validate_ids",
    "embedding.sharding",
    "embedding.uvm_caching",
    "embedding.uvm_cache_load_factor",
    "sparse_optimizer.lr",
    "sparse_optimizer.eps",
    "sparse_optimizer.weight_decay",
    "dense_optimizer.lr",
    "dense_optimizer.eps",
    "dense_optimizer.weight_decay",
    "train.epochs",
    "train.max_steps",
    "train.eval_every",
    "train.eval_batch_size",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.log_every",
    "train.progress",
    "train.pipeline",
    "train.async_checkpoint",
}


_SETS_TOTAL_STEPS = {"train.epochs", "train.max_steps"}
"""Keys that set the total step count: free to change on resume unless the learning rate decays over it."""


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _may_change(key: str) -> bool:
    return (
        key in _MAY_CHANGE
        or key.startswith("run.")
        or (key.startswith("embedding.tables.") and key.endswith(".sharding"))
    )


def data_shape(meta: DatasetMeta) -> dict[str, Any]:
    """What must not change under a resumed run's data set (its path may)."""
    return {
        "dense": list(meta.dense),
        "sparse": {f.name: [f.cardinality, f.multi_hot] for f in meta.sparse},
        "rows": dict(meta.rows),
    }


def check_resumable(
    checkpoint: str, saved: ExperimentConfig, current: ExperimentConfig, info: dict[str, Any], meta: DatasetMeta
) -> None:
    """Raise ``ConfigError`` listing every setting that differs in a way the checkpoint cannot continue.

    Sharding, world size, learning rates, intervals and the data path may change; so may epochs/max_steps,
    unless ``train.lr_decay`` makes the learning rate a function of the total step count (the schedule of the
    original run would silently shift).
    """
    old, new = _flatten(saved.model_dump(mode="json")), _flatten(current.model_dump(mode="json"))
    diffs = []
    for key in sorted(set(old) | set(new)):
        schedule = key in _SETS_TOTAL_STEPS and new.get("train.lr_decay") != "none"
        if (schedule or not _may_change(key)) and old.get(key) != new.get(key):
            why = f" (train.lr_decay={new['train.lr_decay']} decays to the original last step)" if schedule else ""
            diffs.append(f"{key}: {old.get(key)!r} in the checkpoint, {new.get(key)!r} now{why}")
    if info.get("data_shape") != data_shape(meta):
        diffs.append(
            f"data set {current.data.path}: features, cardinalities or row counts differ from the "
            f"checkpoint's ({info.get('data_shape')} vs {data_shape(meta)})"
        )
    if diffs:
        raise ConfigError(
            f"run.dir {current.run.dir} has checkpoint {checkpoint} of a different run; resuming it would change "
            + "; ".join(diffs)
            + ". Use another run.dir, or set run.resume=false to start over (deletes its checkpoints); to train "
            "on new data from this state, use a new run.dir with run.init_from=" + str(current.run.dir)
        )


def _model_shape_keys(config: ExperimentConfig) -> dict[str, Any]:
    """What a warm start must keep: the model, the embeddings (not their placement) and the optimizers' kinds."""
    flat = _flatten(config.model_dump(mode="json"))
    kept = ("model.", "embedding.", "sparse_optimizer.name", "dense_optimizer.name")
    return {k: v for k, v in flat.items() if k.startswith(kept) and not (_may_change(k) or k.endswith(".sharding"))}


def check_warm_start(
    checkpoint: str,
    saved: ExperimentConfig,
    current: ExperimentConfig,
    info: dict[str, Any],
    meta: DatasetMeta,
    identities: tuple[str | None, str | None],
) -> None:
    """Raise ``ConfigError`` (one message) when a warm start from ``checkpoint`` cannot load its state into this
    run: another model, embeddings or optimizer kind, other features or cardinalities, or (``identities`` =
    the checkpoint's and this data set's feature transforms, when both are known) another transform."""
    old, new = _model_shape_keys(saved), _model_shape_keys(current)
    diffs = [
        f"{k}: {old.get(k)!r} in the checkpoint, {new.get(k)!r} now"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]
    shape = info.get("data_shape")
    now = data_shape(meta)
    if shape is not None and {k: shape[k] for k in ("dense", "sparse")} != {k: now[k] for k in ("dense", "sparse")}:
        diffs.append(f"data set {current.data.path}: its features or cardinalities are not the checkpoint's")
    theirs, ours = identities
    if theirs and ours and theirs != ours:
        diffs.append(
            f"data set {current.data.path}: its feature transform ({ours[:12]}) is not the one the checkpoint was "
            f"trained with ({theirs[:12]}); convert the raw data with --features-from {saved.run.dir}"
        )
    if diffs:
        raise ConfigError(f"run.init_from {checkpoint} cannot start this run: " + "; ".join(diffs))


def warm_start_source(config: ExperimentConfig, meta: DatasetMeta) -> tuple[Path, dict[str, Any]]:
    """``run.init_from``'s checkpoint and its ``checkpoint.json``, once :func:`check_warm_start` accepts them."""
    assert config.run.init_from is not None
    checkpoint = resolve_checkpoint(config.run.init_from)
    info = read_checkpoint_info(checkpoint)
    saved = load_config(checkpoint / "config.yaml")
    identities = (ref_identity(checkpoint.parent.parent), dataset_identity(config.data.path))
    check_warm_start(str(checkpoint), saved, config, info, meta, identities)
    return checkpoint, info


def _column_splits(table_plan: dict[str, Any]) -> int:
    return len({tuple(s["offsets"])[1] for s in table_plan.get("shards", [])}) or 1


def check_optimizer_layout(
    checkpoint: str, saved_plan: dict[str, Any], plan: dict[str, Any], sparse_optimizer: str
) -> None:
    """Refuse, before loading anything, a plan change DCP cannot map the fused optimizer state across.

    Weights, Adagrad and SGD reshard freely. Row-wise Adagrad keeps one accumulator per row *and column
    shard* (TorchRec stores it as rows x column shards), so a table whose number of column shards
    changes (e.g. table-/row-wise <-> column-wise) cannot take its state.
    """
    if sparse_optimizer != "rowwise_adagrad":
        return
    moved = []
    for table, new in plan.items():
        old = saved_plan.get(table)
        if old is not None and _column_splits(old) != _column_splits(new):
            moved.append(
                f"{table.rsplit('.', 1)[-1]}: {old['sharding_type']} with {_column_splits(old)} column "
                f"shard(s) -> {new['sharding_type']} with {_column_splits(new)}"
            )
    if moved:
        raise ConfigError(
            f"cannot resume {checkpoint} under this sharding plan: row-wise Adagrad keeps one accumulator per row "
            "and column shard, and these tables change their column split:\n  "
            + "\n  ".join(moved)
            + "\nkeep their sharding type (embedding.sharding / embedding.tables.NAME.sharding) and column split "
            "as in the checkpoint; row-wise and table-wise reshard freely"
        )
