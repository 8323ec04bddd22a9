"""The run directory of ``train``: claimed before training, written by rank 0 while it trains.

``prepare_run_dir`` claims ``run.dir`` through :func:`mlet_torchrec.io.claim_directory` (created with
mlet's marker, or reused if it carries it; refused with one line if it is the data, the working
directory, home or root, or holds files mlet did not write), clears interrupted checkpoint writes and
picks the checkpoint to resume from; ``run.resume=false`` deletes only the checkpoints mlet marked.
``RunLog`` writes ``metrics.jsonl`` and the TensorBoard scalars; rank 0 writes the run's whole summary to
:data:`METRICS_FILE` when it ends.

    >>> run = RunLog(Path(tempfile.mkdtemp()), enabled=True, start_step=0)   # doctest: +SKIP
    >>> run.record(10, "train", {"loss": 0.5}); run.close()                  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from data_pipes.transform import dataset_identity, ref_identity, write_ref
from mlet_torchrec import ranks
from mlet_torchrec.config import ConfigError, ExperimentConfig
from mlet_torchrec.errors import Interrupted, UserError
from mlet_torchrec.io import OutputError, claim_directory, remove_output
from mlet_torchrec.training.checkpoint import (
    TRAIN_COMMAND,
    CheckpointError,
    checkpoint_root,
    committed_checkpoints,
    latest_checkpoint,
    remove_checkpoints,
    remove_incomplete,
    resolve_checkpoint,
)
from mlet_torchrec.training.distributed import DistContext
from mlet_torchrec.training.locks import CheckpointPin, RunDirBusy, RunDirLock, pin
from mlet_torchrec.training.results import StepEvent

if TYPE_CHECKING:  # imported where used: TensorBoard is slow to import
    from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger("mlet.train")

METRICS_FILE = "metrics.json"
"""The run's summary (steps, speed, valid/test metrics, table bytes, world size), written once at the end."""


def prepare_run_dir(config: ExperimentConfig, run_dir: Path, ctx: DistContext, lock: RunDirLock) -> Path | None:
    """Rank 0 claims the run directory (created with mlet's marker, or one that has it; never the
    data, the working directory, home or root, nor a directory of foreign files), takes its ``lock``
    (held until the job ends; refused while another job holds it), clears interrupted checkpoint
    writes and picks the checkpoint to resume from (None: start at step 0); every rank gets its
    decision, or its error."""
    decision: Any = None
    if ctx.is_main:
        try:
            claim_directory(run_dir, command=TRAIN_COMMAND, inputs=[config.data.path])
            lock.acquire()  # before the sweep below: the temporaries it removes are then no live job's
            for leftover in remove_incomplete(run_dir):
                log.info("removed %s (an interrupted checkpoint write)", leftover)
            if config.run.resume:
                found = latest_checkpoint(run_dir)
                record_transform(run_dir, config.data.path, resuming=found is not None)
                decision = ("ok", None if found is None else str(found))
            else:
                removed = remove_checkpoints(run_dir)
                if removed:
                    log.warning(
                        "run.resume=false: deleted the %d checkpoint(s) in %s; starting over",
                        len(removed),
                        checkpoint_root(run_dir),
                    )
                record_transform(run_dir, config.data.path, resuming=False)
                decision = ("ok", None)
        except UserError as e:
            decision = (type(e).__name__, str(e))
        except OSError as e:
            decision = ("ConfigError", f"cannot prepare run.dir {run_dir}: {type(e).__name__}: {e}")
    kind, value = ranks.from_main(decision)
    if kind != "ok":
        errors = {"OutputError": OutputError, "CheckpointError": CheckpointError, "RunDirBusy": RunDirBusy}
        raise errors.get(kind, ConfigError)(value)
    return None if value is None else Path(value)


def record_transform(run_dir: Path, data: Path | str, resuming: bool) -> None:
    """Point the run at its data set's feature transform (``transform-ref.json``: identity and path).

    Resuming a run that was trained with another transform is refused: its ids would mean other values.
    """
    identity = dataset_identity(data)
    if identity is None:
        return
    before = ref_identity(run_dir) if resuming else None
    if before is not None and before != identity:
        raise ConfigError(
            f"data.path {data}: its feature transform ({identity[:12]}) is not the one {run_dir} was trained "
            f"with ({before[:12]}); convert the new data with --features-from {run_dir}"
        )
    write_ref(run_dir, data, identity)


def pinned_checkpoint(path: Path | str, tries: int = 100) -> tuple[Path, CheckpointPin | None]:
    """:func:`resolve_checkpoint` of a checkpoint or run directory, pinned (see ``locks.pin``) before it
    is checked, so that a live run's rotation cannot delete it under its reader. If the newest one is
    rotated away before the pin takes hold, the newest one then is taken (at most ``tries`` times)."""
    for _ in range(tries):
        found = committed_checkpoints(path)
        target = found[-1] if found else Path(path)
        held = pin(target) if target.is_dir() else None
        if held is not None or not found:
            return resolve_checkpoint(target), held
    raise CheckpointError(f"{path}: its newest checkpoint was rotated away {tries} times while being opened")


class RunLog:
    """Rank 0's outputs: metrics.jsonl, TensorBoard scalars and one concise line per event.

    A run that starts at ``start_step`` (0, or the step it resumed from) first drops the records of
    later steps left by an interrupted attempt, so every step is recorded once.
    """

    def __init__(self, run_dir: Path, enabled: bool, start_step: int) -> None:
        self.enabled = enabled
        self._jsonl: TextIO | None = None
        self._tb: SummaryWriter | None = None
        if enabled:
            path = run_dir / "metrics.jsonl"
            kept: list[str] = []
            if path.exists():
                for line in path.read_text().splitlines():
                    try:
                        if json.loads(line).get("step", 0) <= start_step:
                            kept.append(line)
                    except (ValueError, AttributeError):
                        continue
            path.write_text("".join(line + "\n" for line in kept))
            self._jsonl = open(path, "a")
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)

    def record(self, step: int, kind: str, values: dict[str, float]) -> None:
        if self._jsonl is None or self._tb is None:  # not enabled
            return
        self._jsonl.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        self._jsonl.flush()
        for key, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def discard_fresh_run_dir(run_dir: Path | str, existed_before: bool) -> bool:
    """After a user error, remove a run directory this invocation created and left without a checkpoint.

    A bad data file or config found once training has started would otherwise leave a run directory
    holding only its config, plan and first metrics. One that existed before, or that holds a committed
    checkpoint (resumable state), is kept. Returns True if it was removed.
    """
    path = Path(run_dir)
    if existed_before or not path.is_dir() or committed_checkpoints(checkpoint_root(path)):
        return False
    removed = remove_output(path)
    if removed:
        log.debug("removed %s: the run failed before its first checkpoint", path)  # the error is the one line
    return removed


class CtrlC:
    """Python's own SIGINT behaviour (``KeyboardInterrupt``), remembering that it happened.

    A Ctrl-C that lands inside a checkpoint write surfaces as that write's failure (DCP wraps it), not as
    the interrupt. One that lands inside a weakref callback or a ``__del__`` is "unraisable": Python would
    print it as "Exception ignored in ..." with a traceback and go on. :meth:`unraisable` takes those
    instead, and :class:`LastStep` raises the interrupt again at the end of the step.

    Only the first SIGINT is raised: a rank of a local job gets each Ctrl-C twice (from the terminal and from
    the launcher forwarding it), and a second ``KeyboardInterrupt`` landing while the first is turned into the
    one line would lose that line. A process that is a rank of a job installs one for its whole life
    (``launcher._worker``), and :func:`interruptible` joins it.
    """

    def __init__(self, previous_unraisable: Callable[[Any], object]) -> None:
        self.seen = False
        self.swallowed = False
        self._previous_unraisable = previous_unraisable

    def __call__(self, signum: int, frame: object) -> None:
        if self.seen:  # the same Ctrl-C again (a launcher forwards to its ranks what the terminal sent them too)
            return
        self.seen = True
        raise KeyboardInterrupt

    def unraisable(self, info: Any) -> None:
        """A ``sys.unraisablehook``: keeps a lost ``KeyboardInterrupt``, passes the rest to the previous hook."""
        if info.exc_type is not None and issubclass(info.exc_type, KeyboardInterrupt):
            self.swallowed = True
            return
        self._previous_unraisable(info)


class LastStep:
    """A ``train`` hook that remembers the last step completed (for the Ctrl-C message) and raises a
    Ctrl-C that Python could not raise where it landed."""

    def __init__(self, ctrl_c: CtrlC) -> None:
        self.step = 0
        self._ctrl_c = ctrl_c

    def __call__(self, event: StepEvent) -> None:
        self.step = event.step
        if self._ctrl_c.swallowed:
            raise KeyboardInterrupt


def interrupted(run_dir: Path | str, step: int) -> Interrupted:
    """The one line of a Ctrl-C: the step reached and what the same command will do next."""
    found = committed_checkpoints(checkpoint_root(run_dir))
    if found:
        return Interrupted(
            f"interrupted at step {step}, resume with the same command (it goes on from the checkpoint "
            f"{found[-1].name} in {run_dir})"
        )
    return Interrupted(f"interrupted at step {step}, before the first checkpoint: the same command starts over")


@contextlib.contextmanager
def interruptible(run_dir: Path | str) -> Iterator[LastStep]:
    """Turns a Ctrl-C (``KeyboardInterrupt``) in the block into :func:`interrupted`'s one line; yields the
    hook that tracks the step reached."""
    previous_unraisable = sys.unraisablehook
    main_thread = threading.current_thread() is threading.main_thread()
    installed = signal.getsignal(signal.SIGINT) if main_thread else None
    own = main_thread and installed is not signal.SIG_IGN  # a process that ignores Ctrl-C (a pool worker) keeps to it
    ctrl_c = installed if isinstance(installed, CtrlC) else CtrlC(previous_unraisable)  # a rank's: join it
    last = LastStep(ctrl_c)
    previous = signal.signal(signal.SIGINT, ctrl_c) if own else None
    sys.unraisablehook = ctrl_c.unraisable
    try:
        yield last
    except KeyboardInterrupt:
        raise interrupted(run_dir, last.step) from None
    except CheckpointError:
        if ctrl_c.seen:  # the write it broke was aborted; the previous checkpoint is intact
            raise interrupted(run_dir, last.step) from None
        raise
    finally:
        sys.unraisablehook = previous_unraisable
        if own:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
