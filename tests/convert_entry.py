"""A test-only ``mlet`` for tests/test_convert_ranks.py, started by torchrun on every rank: ``mlet ARGS`` with
every shard a rank counts (pass 1) or encodes (pass 2) logged to ``$CONVERT_TEST_LOG`` as ``ATTEMPT count|encode
SHARD RANK`` lines, and rank 1 dying, as if killed, when it starts counting its second shard in the first attempt
and when it starts encoding shard ``$CONVERT_TEST_DIE_AT`` in the second."""

from __future__ import annotations

import os
import sys

import data_pipes.convert.ranks as ranks
from mlet_torchrec.cli.main import main

_count_shards, _encode_shard = ranks.count_shards, ranks.encode_shard
_COUNTED_HERE: list[str] = []  # the shards this process counted


def _log(step: str, shard: str) -> None:
    with open(os.environ["CONVERT_TEST_LOG"], "a") as f:
        f.write(f"{os.environ['TORCHELASTIC_RESTART_COUNT']} {step} {shard} {os.environ['RANK']}\n")


def _dies(attempt: str) -> bool:
    return os.environ["TORCHELASTIC_RESTART_COUNT"] == attempt and os.environ["RANK"] == "1"


def _counted(job, shards, features):  # noqa: ANN001, ANN202 (passes.count_shards's)
    (shard,) = shards
    if _dies("0") and _COUNTED_HERE:  # its first shard's counter file is complete
        os._exit(9)
    result = _count_shards(job, shards, features)
    _COUNTED_HERE.append(f"{shard.part}:{shard.span.start}")
    _log("count", _COUNTED_HERE[-1])  # the counter file is written after this returns
    return result


def _encoded(job, shard, i, encoders, schema, root, marks):  # noqa: ANN001, ANN202 (passes.encode_shard's)
    if _dies("1") and i == int(os.environ["CONVERT_TEST_DIE_AT"]):
        os._exit(9)
    result = _encode_shard(job, shard, i, encoders, schema, root, marks)
    if result.fresh:  # encoded now, not kept from an earlier attempt
        _log("encode", str(i))
    return result


if __name__ == "__main__":
    ranks.count_shards, ranks.encode_shard = _counted, _encoded
    sys.exit(main(sys.argv[1:]))
