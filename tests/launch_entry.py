"""A test-only verb for :func:`mlet_torchrec.training.launcher.run_local` (picklable: module level)."""

from __future__ import annotations

import os
import time

from mlet_torchrec.errors import UserError


def rank() -> int:
    """This process's rank (run_local returns rank 0's: 0)."""
    return int(os.environ["RANK"])


def busy() -> None:
    """Works for two minutes: long enough to be interrupted."""
    time.sleep(120)


def rank0_user_error_rank1_busy() -> None:
    """Rank 0 stops at once with a UserError; rank 1 is still working, so the launcher must stop it."""
    if os.environ["RANK"] == "0":
        raise UserError("data/x.parquet: column label, row 7: 3 is not 0 or 1")
    time.sleep(120)


if __name__ == "__main__":  # the test runs this file: the parent's stderr is what a user sees
    import logging
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from launch_entry import rank0_user_error_rank1_busy as entry  # picklable by module name

    from mlet_torchrec.logs import configure_logging
    from mlet_torchrec.training.launcher import run_local

    configure_logging("INFO")
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    try:
        run_local(2, entry)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
