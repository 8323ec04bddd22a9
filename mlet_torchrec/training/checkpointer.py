"""The checkpoint manager: when to save, the one pending background save, commit and rotation, loading.

:class:`CheckpointManager` owns the ``train.checkpoint_every`` / ``keep_checkpoints`` /
``async_checkpoint`` settings and the named ``Stateful`` objects a checkpoint holds (the model, the
optimizer, :mod:`.state`'s ``TrainState``, ``DataPosition`` and this rank's ``RngState``); DCP saves and
loads them together (checkpoint.py writes, commits atomically and rotates). Every method but
:meth:`CheckpointManager.abandon` is collective: every rank calls it at the same step.

Example:
    >>> manager = CheckpointManager(run_dir, config, {"model": model, "train_state": state})  # doctest: +SKIP
    >>> if manager.due(step, total_steps):                                                     # doctest: +SKIP
    ...     manager.save(step, info)          # in the background with train.async_checkpoint
    >>> manager.save(total_steps, info, final=True)   # committed when it returns               # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch.distributed as dist

from mlet_torchrec.config import ExperimentConfig
from mlet_torchrec.training.checkpoint import PendingCheckpoint, load_states, saved_entries, start_checkpoint


class CheckpointManager:
    """Saves and loads a run's ``states`` (name -> ``Stateful``) in ``run_dir/checkpoints``.

    ``optional`` names the states a checkpoint may lack (a rank's RNG states when the checkpoint was
    written by fewer ranks); :meth:`load` reports which were missing. ``last`` is the newest committed
    checkpoint: the one a run resumed from, then each one this manager commits.
    """

    def __init__(
        self,
        run_dir: Path,
        config: ExperimentConfig,
        states: Mapping[str, Any],
        optional: Collection[str] = (),
        last: Path | None = None,
    ) -> None:
        self.run_dir, self.config = run_dir, config
        self.states, self.optional = dict(states), frozenset(optional)
        self.every, self.keep = config.train.checkpoint_every, config.train.keep_checkpoints
        self.background = config.train.async_checkpoint
        # background writes get their own group: their collectives must not interleave with training's
        self._async_group = dist.new_group(backend="gloo") if self.background else None
        self._pending: PendingCheckpoint | None = None
        self.last = last

    def due(self, step: int, total_steps: int) -> bool:
        """Whether ``step`` is an interval checkpoint (the last step's is the final one, written apart)."""
        return bool(self.every) and step % self.every == 0 and step < total_steps

    def save(self, step: int, info: dict[str, Any], final: bool = False) -> Path | None:
        """Save every state at ``step`` with ``info`` in its ``checkpoint.json``.

        The pending background save is committed first (one at a time, in order). In the background
        (``train.async_checkpoint``, not ``final``) this returns None once the tensors are copied;
        otherwise it returns the committed checkpoint.
        """
        self.commit_pending()
        background = self.background and not final
        group = self._async_group if background else None
        started = start_checkpoint(self.run_dir, step, self.states, self.config, info, self.keep, group)
        if background:
            self._pending = started
            return None
        self.last = started.finish()
        return self.last

    def commit_pending(self) -> None:
        """Wait for the background save, if any, and commit it once every rank's write is complete."""
        if self._pending is not None:
            done, self._pending = self._pending, None
            self.last = done.finish()

    def abandon(self) -> None:
        """Not collective (the run is failing): the pending background save never becomes visible."""
        if self._pending is not None:
            done, self._pending = self._pending, None
            done.abandon()

    def load(self, checkpoint: Path, names: Collection[str] | None = None) -> set[str]:
        """Load the states ``names`` (default: all) from ``checkpoint`` in place; returns the optional ones
        it lacks (left as they were).

        Resume loads all; a warm start (a new run continuing another's weights on other data) would load
        ``names=("model", "optimizer")`` and keep its fresh step, data position and RNG.
        """
        wanted = set(self.states) if names is None else set(names)
        missing = (wanted & self.optional) - saved_entries(checkpoint)
        load_states(checkpoint, {name: self.states[name] for name in sorted(wanted - missing)})
        return missing
