"""What ``mlet train`` and ``mlet evaluate`` print when they succeed: a few lines for a person.

The whole result is JSON in the run directory (:data:`~mlet_torchrec.training.run_dir.METRICS_FILE`) and on
stdout with ``--json``.

    >>> print("\\n".join(evaluate_lines({"model": "runs/a/checkpoints/step_00000100", "kind": "run", "split": "test",
    ...     "data": "data/tiny", "auc": 0.75, "logloss": 0.5, "pr_auc": 0.7, "calibration": 1.02, "rows": 800})))
    runs/a/checkpoints/step_00000100 (run) on the test split of data/tiny (800 rows):
      AUC 0.7500  LogLoss 0.5000  PR-AUC 0.7000  calibration 1.020
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def metrics_text(m: dict[str, Any]) -> str:
    """One split's headline metrics on one line, 4 decimals (the run directory keeps every digit)."""
    return (
        f"AUC {m['auc']:.4f}  LogLoss {m['logloss']:.4f}  PR-AUC {m['pr_auc']:.4f}  calibration {m['calibration']:.3f}"
    )


def train_lines(summary: dict[str, Any]) -> list[str]:
    """At most 6 lines: steps and speed, valid and test metrics, where the checkpoint and the summary are."""
    from mlet_torchrec.training.run_dir import METRICS_FILE

    run_dir = Path(summary["run_dir"])
    resumed = summary.get("resumed_from")
    lines = [
        f"trained {summary['steps']} steps"
        + (f" (resumed at step {summary['start_step']})" if resumed else "")
        + f" in {summary['train_seconds']:.1f} s, {summary['samples_per_second']:,.0f} samples/s"
    ]
    for split in ("valid", "test"):
        if summary.get(split):
            lines.append(f"  {split + ':':6} {metrics_text(summary[split])}  ({summary[split]['rows']:,} rows)")
    lines.append(f"checkpoint: {summary['checkpoint']}")
    lines.append(f"every figure: {run_dir / METRICS_FILE} (or --json)")
    return lines


def evaluate_lines(metrics: dict[str, Any]) -> list[str]:
    """What was scored (model, split, data set, rows) and its metrics: 2 lines."""
    return [
        f"{metrics['model']} ({metrics['kind']}) on the {metrics['split']} split of {metrics['data']} "
        f"({metrics['rows']:,} rows):",
        f"  {metrics_text(metrics)}",
    ]
