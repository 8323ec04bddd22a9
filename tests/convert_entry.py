"""A test-only ``mlet`` for tests/test_convert_ranks.py, started by torchrun on every rank: ``mlet ARGS``
with each shard that a rank encodes logged (``ATTEMPT SHARD`` lines in ``$CONVERT_TEST_LOG``, once the
shard is complete), and rank 1 of the first attempt dying, as if killed, when it reaches shard
``$CONVERT_TEST_DIE_AT``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import data_pipes.convert.ranks as ranks
from mlet_torchrec.cli.main import main

_encode_to_spool = ranks.encode_to_spool


def _logged(job, shard, encoders, schema, spool: Path, i: int):  # noqa: ANN001, ANN202 (passes.encode_to_spool's)
    attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
    if attempt == "0" and os.environ["RANK"] == "1" and i == int(os.environ["CONVERT_TEST_DIE_AT"]):
        os._exit(9)
    result = _encode_to_spool(job, shard, encoders, schema, spool, i)
    if result[2]:  # encoded now, not kept from an earlier attempt
        with open(os.environ["CONVERT_TEST_LOG"], "a") as f:
            f.write(f"{attempt} {i}\n")
    return result


if __name__ == "__main__":
    ranks.encode_to_spool = _logged
    sys.exit(main(sys.argv[1:]))
