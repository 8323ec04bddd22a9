"""What a resume needs beyond the tensors: data position, RNG states, optimizer-state templates and
the check that a checkpoint belongs to the run being resumed.

Data position. The reader is deterministic per (seed, epoch): the position after a step is
``(epoch, batches_in_epoch)``, counted in global batches. :class:`ResumableReader` starts an epoch
after its first ``k`` batches without decoding them: it drops whole row groups from the Parquet
footers' row counts and slices at most one row group per DataLoader worker. With the same world size
and ``data.num_workers`` the resumed run sees exactly the batches an uninterrupted run would; at another
world size the rows of a global batch are the same only when a row group is one local batch long
(the rank split is by row group), otherwise the rest of the epoch is the new layout's, from the same
number of batches on.

RNG. Each rank saves its torch (and CUDA), numpy and ``random`` states; a resumed rank restores its own
(or, when the world grew and it has none, seeds from (seed, step, rank)). Training itself draws
from the global torch RNG only in the model (dropout); DataLoaders get their own generator.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, get_worker_info
from torchrec.datasets.utils import Batch

from data_pipes.reader import ParquetBatchReader, Unit
from data_pipes.schema import DatasetMeta
from mlet_torchrec.config import ConfigError, ExperimentConfig

log = logging.getLogger("mlet.train")


# ---------------------------------------------------------------------------------------- data position


def worker_batch_share(counts: Sequence[int], k: int) -> Tuple[List[int], int]:
    """(batches each worker yielded among the first ``k``, the worker that yields batch ``k + 1``).

    A DataLoader over an IterableDataset takes batches from its workers round-robin, starting at
    worker 0, and skips the workers that are exhausted; ``counts[w]`` is worker ``w``'s batch count.
    """
    taken = [0] * len(counts)
    remaining, r = k, 0
    while True:
        active = [w for w, c in enumerate(counts) if c > r]
        if not active:
            return taken, 0
        if remaining < len(active):
            for w in active[:remaining]:
                taken[w] += 1
            return taken, active[remaining]
        for w in active:
            taken[w] += 1
        remaining -= len(active)
        r += 1


class ResumableReader(ParquetBatchReader):
    """A ``ParquetBatchReader`` that can start an epoch after its first ``k`` (rank-local) batches."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._skip: Tuple[int, int, int] = (0, 0, 1)  # (epoch, batches, num_workers)
        self._head: Optional[Tuple[int, int, int]] = None  # (file, row group, rows to drop)

    def set_position(self, epoch: int, batches: int, num_workers: int) -> None:
        """Start ``epoch`` after its first ``batches`` batches (as a DataLoader with ``num_workers``
        workers yields them); other epochs start at their beginning."""
        self.set_epoch(epoch)
        self._skip = (int(epoch), int(batches), max(1, int(num_workers)))

    def _worker_batches(self, units: Sequence[Unit]) -> int:
        rows = sum(self._group_rows[f][g] for f, g in units)
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        units = self._rank_units(self.epoch)
        epoch, batches, skip_workers = self._skip
        if epoch != self.epoch or batches <= 0:
            return self._stream(units[worker::workers])
        if skip_workers != workers:
            raise RuntimeError(f"position set for {skip_workers} DataLoader workers, iterated with {workers}")
        counts = [self._worker_batches(units[w::workers]) for w in range(workers)]
        taken, first = worker_batch_share(counts, batches)
        # The new DataLoader starts its round-robin at worker 0, the interrupted one was due at worker
        # `first`: worker i of the new one continues the stream of worker (first + i) of the old one,
        # which yields the same cyclic order.
        source = (first + worker) % workers
        return self._stream_from(units[source::workers], taken[source] * self.batch_size)

    def _stream_from(self, units: Sequence[Unit], skip_rows: int) -> Iterator[Batch]:
        i = 0
        while i < len(units) and skip_rows >= self._group_rows[units[i][0]][units[i][1]]:
            skip_rows -= self._group_rows[units[i][0]][units[i][1]]
            i += 1
        rest = list(units[i:])
        self._head = (rest[0][0], rest[0][1], skip_rows) if rest and skip_rows else None
        return self._stream(rest)

    def _read(self, pf: Any, f: int, g: int) -> Any:
        chunk = super()._read(pf, f, g)
        if self._head is not None and self._head[:2] == (f, g):
            chunk = chunk.slice(self._head[2], chunk.rows)
            self._head = None
        return chunk


def dataloader(reader: ParquetBatchReader, num_workers: int, seed: int, epoch: int) -> DataLoader:
    """The reader's DataLoader for one epoch, with its own generator: creating it leaves the global
    torch RNG alone (a plain DataLoader draws its base seed from it), so resumes stay exact."""
    gen = torch.Generator().manual_seed((int(seed) << 20) + int(epoch))
    return DataLoader(reader, batch_size=None, num_workers=num_workers, persistent_workers=False, generator=gen)


def normalize_position(epoch: int, batches: int, epoch_steps: Sequence[int]) -> Tuple[int, int]:
    """``(epoch, batches)`` moved past epochs that are already complete under ``epoch_steps``."""
    while epoch < len(epoch_steps) and batches >= epoch_steps[epoch]:
        epoch, batches = epoch + 1, 0
    return epoch, batches


# ---------------------------------------------------------------------------------------------- RNG


def rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def reseed(seed: int, step: int, rank: int) -> None:
    mixed = (int(seed) * 1_000_003 + int(step) * 7919 + int(rank)) % (2**32)
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
            for g, lr in zip(opt.param_groups, lrs):
                if lr is not None:
                    g["lr"] = lr
            for p in opt.params.values():
                p.grad = None


# -------------------------------------------------------------------------------- run compatibility

# Keys a resumed run may change: how it runs, not what it trains.
_MAY_CHANGE = {
    "data.path", "data.num_workers", "data.validate_ids",
    "embedding.sharding",
    "sparse_optimizer.lr", "sparse_optimizer.eps", "sparse_optimizer.weight_decay",
    "dense_optimizer.lr", "dense_optimizer.eps", "dense_optimizer.weight_decay",
    "train.epochs", "train.max_steps", "train.eval_every", "train.eval_batch_size", "train.checkpoint_every",
    "train.keep_checkpoints", "train.log_every", "train.progress",
}


def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: Dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _may_change(key: str) -> bool:
    return key in _MAY_CHANGE or key.startswith("run.") or (
        key.startswith("embedding.tables.") and key.endswith(".sharding")
    )


def data_shape(meta: DatasetMeta) -> Dict[str, Any]:
    """What must not change under a resumed run's data set (its path may)."""
    return {"dense": list(meta.dense), "sparse": {f.name: [f.cardinality, f.multi_hot] for f in meta.sparse},
            "rows": dict(meta.rows)}


def check_resumable(checkpoint: str, saved: ExperimentConfig, current: ExperimentConfig,
                    info: Dict[str, Any], meta: DatasetMeta) -> None:
    """Raise ``ConfigError`` listing every setting that differs in a way the checkpoint cannot continue.

    Sharding, world size, learning rates, epochs/max_steps, intervals and the data path may change.
    """
    if "position" not in info:
        raise ConfigError(f"checkpoint {checkpoint} has no data position (written before resumable checkpoints); "
                          "set run.resume=false or choose a new run.dir")
    old, new = _flatten(saved.model_dump(mode="json")), _flatten(current.model_dump(mode="json"))
    diffs = []
    for key in sorted(set(old) | set(new)):
        if not _may_change(key) and old.get(key) != new.get(key):
            diffs.append(f"{key}: {old.get(key)!r} in the checkpoint, {new.get(key)!r} now")
    if info.get("data_shape") is not None and info["data_shape"] != data_shape(meta):
        diffs.append(f"data set {current.data.path}: features, cardinalities or row counts differ from the "
                     f"checkpoint's ({info['data_shape']} vs {data_shape(meta)})")
    if diffs:
        raise ConfigError(
            f"run.dir {current.run.dir} has checkpoint {checkpoint} of a different run; resuming it would change:\n  "
            + "\n  ".join(diffs)
            + "\nuse another run.dir, or set run.resume=false to start over (deletes its checkpoints)"
        )


def _column_splits(table_plan: Dict[str, Any]) -> int:
    return len({tuple(s["offsets"])[1] for s in table_plan.get("shards", [])}) or 1


def check_optimizer_layout(checkpoint: str, saved_plan: Dict[str, Any], plan: Dict[str, Any],
                           sparse_optimizer: str) -> None:
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
            moved.append(f"{table.rsplit('.', 1)[-1]}: {old['sharding_type']} with {_column_splits(old)} column "
                         f"shard(s) -> {new['sharding_type']} with {_column_splits(new)}")
    if moved:
        raise ConfigError(
            f"cannot resume {checkpoint} under this sharding plan: row-wise Adagrad keeps one accumulator per row "
            "and column shard, and these tables change their column split:\n  " + "\n  ".join(moved)
            + "\nkeep their sharding type (embedding.sharding / embedding.tables.NAME.sharding) and column split "
              "as in the checkpoint; row-wise and table-wise reshard freely"
        )
