"""The options every converter shares (the ``mlet convert`` flags of the same names).

>>> ConvertOptions(hash_buckets=1000).hash_buckets
{'*': 1000}
>>> ConvertOptions(hash_buckets={"C3": 11}, min_count=5).as_dict()["min_count"]
5
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_pipes.errors import OptionError

DEFAULT_BLOCK_SIZE = 4 << 20  # text per block (~16K Criteo rows); memory is a few times this
# An uncompressed input is cut into shards of about this many bytes (~260K Criteo rows), whatever --jobs
# or the number of ranks: each shard is encoded by one process into its own Parquet files.
DEFAULT_SHARD_SIZE = 64 << 20
# The trainer's reader shuffles and shards by row group, so groups are small (as data_pipes.synth's).
DEFAULT_ROW_GROUP_ROWS = 8192
DEFAULT_ROWS_PER_FILE = 64 * DEFAULT_ROW_GROUP_ROWS


@dataclass
class ConvertOptions:
    """Options shared by every converter (the CLI flags of the same names).

    ``hash_buckets``: an int hashes every categorical feature into that many rows; a mapping
    ``{feature: buckets}`` hashes only those features (key ``"*"`` for all others); features not hashed
    get a vocabulary of the values seen at least ``min_count`` times in the train split.
    """

    min_count: int = 1
    hash_buckets: None | int | Mapping[str, int] = None
    seed: int = 0
    lenient: bool = False
    overwrite: bool = False
    progress: bool | None = None  # None: show a progress bar when stderr is a terminal
    block_size: int = DEFAULT_BLOCK_SIZE
    shard_size: int = DEFAULT_SHARD_SIZE
    rows_per_file: int = DEFAULT_ROWS_PER_FILE
    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS
    compression: str = "snappy"
    features_from: str | Path | None = None  # encode with this transform (a data set, run, export...)
    split_name: str = "test"  # with features_from: the split every row goes to
    jobs: int = 1  # processes for the two passes (the output does not depend on it: not in as_dict)
    rank: int = 0  # this process's rank in a job of ``world_size`` (torchrun/TorchX; see data_pipes.convert.ranks)
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.min_count < 1:
            raise OptionError(f"--min-count must be >= 1, got {self.min_count}")
        if self.block_size < 4096:
            raise OptionError(f"--block-size-mb must be at least 4096 bytes, got {self.block_size} bytes")
        if self.shard_size < 4096:
            raise OptionError(f"--shard-size-mb must be at least 4096 bytes, got {self.shard_size} bytes")
        if self.row_group_rows < 1 or self.rows_per_file < 1:
            raise OptionError(
                f"--rows-per-file and --row-group-rows must be >= 1, got {self.rows_per_file}, {self.row_group_rows}"
            )
        if isinstance(self.jobs, bool) or not isinstance(self.jobs, (int, np.integer)) or self.jobs < 1:
            raise OptionError(f"--jobs must be an integer >= 1, got {self.jobs!r}")
        if not 0 <= self.rank < self.world_size:
            raise OptionError(f"rank {self.rank} is not in a job of {self.world_size} processes")
        if self.world_size > 1 and self.jobs > 1:
            raise OptionError(
                f"--jobs {self.jobs} in a job of {self.world_size} processes: each rank is one process; "
                "give more processes with -j NODESxPROCS instead"
            )
        if self.split_name not in ("train", "valid", "test"):
            raise OptionError(f"split_name must be train, valid or test, got {self.split_name!r}")
        if self.features_from is not None and self.hash_buckets is not None:
            raise OptionError("hash buckets come from --features-from's transform; do not give --hash-buckets too")
        buckets = self.hash_buckets
        if buckets is not None and not isinstance(buckets, Mapping):
            buckets = {"*": buckets}
        for name, n in (buckets or {}).items():
            if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 2:
                raise OptionError(f"hash buckets for {name!r} must be an integer >= 2 (row 0 is the OOV id), got {n!r}")
        self.hash_buckets = dict(buckets) if buckets else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "min_count": self.min_count,
            "hash_buckets": self.hash_buckets,
            "seed": self.seed,
            "lenient": self.lenient,
            "block_size": self.block_size,
            "shard_size": self.shard_size,
            "rows_per_file": self.rows_per_file,
            "row_group_rows": self.row_group_rows,
            "compression": self.compression,
            "features_from": None if self.features_from is None else str(self.features_from),
            "split_name": self.split_name if self.features_from is not None else None,
        }


__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_SHARD_SIZE",
    "DEFAULT_ROWS_PER_FILE",
    "DEFAULT_ROW_GROUP_ROWS",
    "ConvertOptions",
]
