"""Test-only entry point: ``train`` with fault injection, for the reliability tests.

Used two ways, with the same JSON ``spec`` (nothing is read from the environment but torchrun's own
``RANK``/``TORCHELASTIC_RESTART_COUNT``):

* ``run_local(nproc, partial(reliability_entry.run, config_dict, spec))`` (:mod:`mlet_torchrec.training.launcher`)
* ``torchrun --max-restarts N tests/reliability_entry.py --config CFG.json --spec SPEC.json``

``spec`` keys (all optional):

``out``            directory for traces and results (per rank and attempt)
``kill``           {"step", "rank", "attempt"}: SIGKILL that rank after that step (attempt = restart count)
``kill_in_write``  {"step", "rank", "attempt"}: SIGKILL that rank inside the DCP write of that step's
                   checkpoint, after its data files are written and before the commit
``nan``            {"step", "rank"}: after that step, fill that rank's copy of a dense weight with NaN
``enospc``         {"step", "rank"}: the DCP writer of that rank raises ENOSPC for that step's checkpoint
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import signal
import sys
import zlib
from pathlib import Path
from typing import Any


def _attempt() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _matches(rule: dict[str, Any] | None, step: int) -> bool:
    if not rule:
        return False
    return step == rule["step"] and _rank() == rule.get("rank", 0) and _attempt() == rule.get("attempt", _attempt())


def _patch_writer(spec: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    original = FileSystemWriter.write_data

    def write_data(self, plan, planner):  # type: ignore[no-untyped-def]
        # the checkpoint's temporary directory: .step_00000016.mlet-tmp-<pid>-<hex>
        step = int(re.search(r"step_(\d+)", Path(str(self.path)).name).group(1))
        if _matches(spec.get("enospc"), step):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        fut = original(self, plan, planner)
        if _matches(spec.get("kill_in_write"), step):
            fut.wait()  # this rank's shard files are on disk; the checkpoint is not committed
            os.kill(os.getpid(), signal.SIGKILL)
        return fut

    FileSystemWriter.write_data = write_data  # type: ignore[method-assign]


def _hook(spec: dict[str, Any], out: Path):  # type: ignore[no-untyped-def]
    import torch

    trace = open(out / f"trace.rank{_rank()}.attempt{_attempt()}.jsonl", "a")

    def hook(ev) -> None:  # type: ignore[no-untyped-def]
        kjt = ev.batch.sparse_features
        trace.write(
            json.dumps(
                {
                    "step": ev.step,
                    "epoch": ev.epoch,
                    "batches": ev.batches_in_epoch,
                    "loss": ev.loss,
                    "labels": float(ev.batch.labels.sum()),
                    "ids": zlib.crc32(kjt.values().numpy().tobytes()) ^ zlib.crc32(kjt.lengths().numpy().tobytes()),
                    "checkpoint": None if ev.checkpoint is None else Path(ev.checkpoint).name,
                }
            )
            + "\n"
        )
        trace.flush()
        if _matches(spec.get("kill"), ev.step):
            os.kill(os.getpid(), signal.SIGKILL)
        if _matches(spec.get("nan"), ev.step):
            with torch.no_grad():
                for name, p in ev.model.named_parameters():
                    if "over_arch" in name and p.dim() == 2:
                        p.fill_(float("nan"))
                        break

    return hook


def run(config: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    from mlet_torchrec.config import ExperimentConfig
    from mlet_torchrec.logs import configure_logging
    from mlet_torchrec.training.checkpoint import checkpoint_root, latest_checkpoint
    from mlet_torchrec.training.train import train

    configure_logging(False)
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    cfg = ExperimentConfig.model_validate(config)
    if _rank() == 0:  # what this attempt finds on disk before train() tidies up
        root = checkpoint_root(cfg.run.dir)
        found = latest_checkpoint(cfg.run.dir)
        (out / f"start.attempt{_attempt()}.json").write_text(
            json.dumps(
                {
                    "latest": None if found is None else found.name,
                    "dirs": sorted(p.name for p in root.iterdir()) if root.is_dir() else [],
                }
            )
        )
    _patch_writer(spec)
    result_file = out / f"result.rank{_rank()}.attempt{_attempt()}.json"
    try:
        summary = train(cfg, hooks=[_hook(spec, out)]).summary()
    except BaseException as e:
        import traceback

        result_file.write_text(
            json.dumps({"error": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()})
        )
        raise
    result_file.write_text(json.dumps(summary, default=str))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True, help="JSON of an ExperimentConfig")
    p.add_argument("--spec", required=True, help="JSON fault-injection spec")
    args = p.parse_args(argv)
    run(json.loads(Path(args.config).read_text()), json.loads(Path(args.spec).read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
