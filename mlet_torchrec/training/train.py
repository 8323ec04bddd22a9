"""``train(config)``: the training loop every entry point calls (CLI, TorchX, tests, demo).

Run it in each process of a torchrun/TorchX/elastic_launch job, or directly for one process.
Outputs land in ``config.run.dir``: the resolved ``config.yaml``, ``plan.json``,
``metrics.jsonl`` (one line per log/eval), ``metrics.json`` (final), ``tensorboard/`` and
``checkpoints/``.

Resume (``run.resume``, on by default): a run whose ``run.dir`` holds a complete checkpoint
continues from the newest one: model, fused (W1) and dense optimizer state, step, data position
(epoch, batches consumed in it) and every rank's RNG states (typed ``Stateful`` objects, state.py, saved
together through DCP by the ``CheckpointManager``, checkpointer.py), so a run stopped at step s and
resumed ends with the same weights and metrics as an uninterrupted one. That is what a
torchrun/TorchX restart (``max_restarts``) relies on: the restarted workers run the same command in
the same ``run.dir``. The world size and sharding plan may differ from the checkpoint's (DCP
reshards weights and optimizer state); settings that change what is trained may not
(``train_state.check_resumable``). ``run.resume=false`` starts over and deletes the old checkpoints
(only those mlet marked). ``run.dir`` is claimed with mlet's output marker (``run_dir.py``): one that
holds foreign files, or is the data, the working directory, home or root, is refused in one line.

The loop is :class:`~mlet_torchrec.training.trainer.Trainer` (trainer.py), which also says how a warm
start (``run.init_from``) loads and where a run-directory lock and a rule for changed ``train.epochs`` on
resume hook in.

Steps: driven by TorchRec's ``TrainPipelineSparseDist`` by default (``train.pipeline``, loop.py), with
the lr schedule and dense gradient clipping of ``optim.py``. The loop never waits on the device
between log points: the loss, row counts and the NaN check accumulate there and are read every
``train.log_every`` steps and before every checkpoint.

Checkpoints: every ``train.checkpoint_every`` steps and at the end, atomically, the newest
``train.keep_checkpoints`` kept (checkpoint.py; in the background with ``train.async_checkpoint``). A
non-finite loss on any rank stops every rank at the next read with ``TrainingDiverged``, naming the
step where it first appeared; no checkpoint is ever written after it or from non-finite weights.

Lifecycle: ``train`` runs inside ``distributed.process_group``; on return or on error the group is
destroyed (after a barrier when all went well) and the progress bar, TensorBoard writer and DataLoader
workers are closed, so a finished job exits cleanly.

Example:
    >>> from mlet_torchrec.config import load_config
    >>> cfg = load_config("configs/tiny.yaml", ["run.dir=runs/doc"])   # doctest: +SKIP
    >>> result = train(cfg)                                             # doctest: +SKIP
    >>> result.test.auc                                                 # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mlet_torchrec.config import ExperimentConfig
from mlet_torchrec.errors import UserError
from mlet_torchrec.training.checkpoint import CheckpointError
from mlet_torchrec.training.distributed import process_group
from mlet_torchrec.training.guardrails import TablesDoNotFit, TrainingDiverged
from mlet_torchrec.training.locks import RunDirLock
from mlet_torchrec.training.results import StepEvent, StepHook, TrainResult, table_bytes
from mlet_torchrec.training.run_dir import discard_fresh_run_dir, interruptible
from mlet_torchrec.training.trainer import Trainer

__all__ = ["train", "TrainResult", "StepEvent", "TrainingDiverged", "TablesDoNotFit", "CheckpointError", "table_bytes"]


def train(config: ExperimentConfig, hooks: Sequence[StepHook] = ()) -> TrainResult:
    """Train ``config`` on every rank of the current job; returns the same result on every rank.

    ``hooks`` are called on every rank after every step (after its checkpoint, if any). The process
    group (and every thread and DataLoader worker of the run) is shut down before it returns or raises,
    unless the caller set the group up.
    """
    existed_before = Path(config.run.dir).exists()
    with process_group(config.run.device) as ctx, RunDirLock(config.run.dir) as lock:
        try:
            with interruptible(config.run.dir) as last:  # Ctrl-C: one line, exit 130, resumable
                return Trainer(config, ctx, lock, [*hooks, last]).train()
        except UserError:
            # several ranks may fail at different steps: the local launcher's parent cleans up for them
            if ctx.world_size == 1:
                discard_fresh_run_dir(config.run.dir, existed_before)
            raise
