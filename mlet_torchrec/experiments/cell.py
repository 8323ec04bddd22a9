"""One cell of a sweep: train it (in a child process, or here), then measure it (:mod:`.analysis`).

The child is ``python -m mlet_torchrec.experiments.sweep --cell SPEC``; it writes its measurements to the
spec's output file, which the sweep reads back.

Example:
    >>> meas = run_cell_here(config, nproc=1, freq_features=None)   # doctest: +SKIP
    >>> meas["test"]["auc"]                                         # doctest: +SKIP
    0.71
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlet_torchrec.config import ExperimentConfig
from mlet_torchrec.experiments.analysis import analyse_run
from mlet_torchrec.experiments.store import json_default
from mlet_torchrec.io import atomic_write_text


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM (Linux: ``5`` into /proc/self/clear_refs); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vm_hwm_kb() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def run_cell_here(
    config: ExperimentConfig,
    nproc: int,
    freq_features: Sequence[str] | None,
    shared_process: bool = False,
    compression: bool = True,
) -> dict[str, Any]:
    """Train and analyse one cell in this process (the child the sweep starts, or the sweep itself with
    ``shared_process``: peak RSS is then this process's VmHWM, reset before training); returns the measurements,
    or ``{"status": "diverged", "error": ...}`` when the NaN guard stopped the training (a result, not a failure)."""
    try:
        return _measure_cell(config, nproc, freq_features, shared_process, compression)
    except Exception as e:  # noqa: BLE001 - only a divergence is a result; anything else fails the cell
        if not _diverged(e):
            raise
        return {"status": "diverged", "error": str(e)[-2000:]}


def _diverged(e: BaseException) -> bool:
    """A run stopped by the NaN guard (``TrainingDiverged``), also when it came back from worker processes."""
    from mlet_torchrec.training.guardrails import TrainingDiverged

    return isinstance(e, TrainingDiverged) or "TrainingDiverged" in repr(e)


def _measure_cell(
    config: ExperimentConfig, nproc: int, freq_features: Sequence[str] | None, shared_process: bool, compression: bool
) -> dict[str, Any]:
    t0 = time.time()
    if shared_process:
        if nproc != 1:
            raise ValueError("in-process cells train on one process (--nproc-per-node 1)")
        from mlet_torchrec.training.train import train

        reset = _reset_peak_rss()
        summary = train(config).summary()
        hwm = _vm_hwm_kb()
        if reset and hwm is not None:
            rss_kb, rss_source = hwm, "VmHWM of the sweep process (reset before the cell, read after training)"
        else:
            rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            rss_source = "RUSAGE_SELF max RSS of the sweep process (cumulative over cells: peak reset unsupported)"
    elif nproc > 1:
        from mlet_torchrec.training.launcher import train_local

        summary = train_local(config, nproc)
        rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        rss_source = "RUSAGE_CHILDREN max RSS of the cell process (largest training worker)"
    else:
        from mlet_torchrec.training.train import train

        summary = train(config).summary()
        rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss_source = "RUSAGE_SELF max RSS of the (single) training process, read before analysis"
    wall_train = time.time() - t0
    run_dir = Path(summary["run_dir"])
    extra = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else {}
    t1 = time.time()
    analysis = analyse_run(run_dir, freq_features, compression=compression)
    steps = max(1, int(summary["steps"]))
    return {
        "steps": summary["steps"],
        "train_seconds": summary["train_seconds"],
        "seconds_per_iter": summary["train_seconds"] / steps,
        "samples_per_second": summary["samples_per_second"],
        "valid": summary.get("valid"),
        "test": summary.get("test"),
        "serving_table_bytes": extra.get("serving_table_bytes"),
        "training_table_bytes": extra.get("training_table_bytes"),
        "world_size": extra.get("world_size", nproc),
        "peak_rss_mb": rss_kb / 1024.0,
        "peak_rss_source": rss_source,
        "wall_seconds_train": wall_train,
        "wall_seconds_analysis": time.time() - t1,
        **analysis,
    }


def _cell_main(argv: Sequence[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    from mlet_torchrec.logs import configure_logging

    configure_logging(False)
    config = ExperimentConfig.model_validate(spec["config"])
    out = run_cell_here(config, spec["nproc"], spec.get("freq_features"), compression=spec.get("compression", True))
    atomic_write_text(spec["output"], json.dumps(out, default=json_default))  # complete or absent
    return 0
