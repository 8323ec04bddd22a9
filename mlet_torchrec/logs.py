"""How every ``mlet`` process logs: one format with time, rank and level, and only named warnings silenced.

    >>> configure_logging("INFO")
    >>> logging.getLogger("mlet.doc").info("step 20 loss 0.6931")   # doctest: +SKIP
    2026-01-01 12:00:00,123 rank0 INFO mlet.doc: step 20 loss 0.6931

The rank is the ``RANK`` environment variable that torchrun and ``elastic_launch`` set (0 outside a
distributed job). Python warnings are routed through ``logging`` too, so they carry the same prefix.
"""

from __future__ import annotations

import logging
import os
import warnings

LOG_FORMAT = "%(asctime)s rank%(rank)s %(levelname)s %(name)s: %(message)s"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
"""The values of ``--log-level``."""

KNOWN_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # (message regex, category, why it is silenced); seen in `mlet train --config tiny --nproc-per-node 2`
    (
        r"`broadcast_buffers` is deprecated",
        FutureWarning,
        "TorchRec 1.8's DistributedModelParallel passes the flag to DDP itself; our code never sets it",
    ),
    (
        r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
        FutureWarning,
        "called inside TorchRec's embedding collectives, not by us; the replacements are not in TorchRec 1.8",
    ),
    (
        r"HeuristicalStorageReservation is known to cause issues",
        FutureWarning,
        "TorchRec's planner default; it can only over-estimate dense memory, and our dense parts are small",
    ),
    (
        r"(?s).*Failed to import.{1,3}fbgemm_gpu\.split_embedding_codegen_lookup_invokers\.lookup_.*_ssd",
        DeprecationWarning,
        "fbgemm-gpu-cpu is built without the SSD-offload kernels, which no config here asks for",
    ),
    (
        r"(?s).*The Python module fbgemm_gpu\.split_table_batched_embeddings_ops is now DEPRECATED",
        DeprecationWarning,
        "imported by TorchRec 1.8 itself; we import only the _training/_inference modules",
    ),
    (
        r"distutils Version classes are deprecated",
        DeprecationWarning,
        "torchmetrics 1.0 (a TorchRec dependency) checks the Python version with LooseVersion on import",
    ),
    (
        r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to (load|save) in a "
        r"single process",
        UserWarning,
        "DCP's note when a one-process collapse or export reads or writes a checkpoint: that is the intent",
    ),
    (
        r".*Please use DTensor instead",
        FutureWarning,
        "TorchRec 1.8 still hands out ShardedTensor from state_dict(); checkpoint and collapse must read it",
    ),
    (
        # \x3a is ':' (pytest's filterwarnings splits its spec at literal colons)
        r"fbgemm\x3a\x3adense_embedding_codegen_lookup_function\x3a an autograd kernel was not registered",
        UserWarning,
        "the planner's data_parallel tables use fbgemm's dense kernel, which fbgemm-gpu-cpu registers for CPU "
        "and whose CPU kernel records its own autograd node, so torch's fallback only adds a hook that warns; "
        "tests/test_known_warnings.py checks its gradients against torch's embedding_bag, and "
        "tests/test_distributed.py 2-rank data_parallel training against 1 process",
    ),
    (
        r"The TorchScript type system doesn't support instance-level annotations on empty non-base types",
        UserWarning,
        "export scripts a torch.fx.GraphModule; TorchScript checks GraphModule.__init__, where torch annotates its "
        "empty Python-only hook lists and meta dict, which a scripted module does not carry "
        "(tests/test_known_warnings.py)",
    ),
    (
        r"TorchScript will treat type annotations of Tensor dtype-specific subtypes as if they are normal Tensors",
        UserWarning,
        "TorchRec 1.8's KeyedJaggedTensor code annotates Optional[torch.IntTensor]; scripted it is a Tensor holding "
        "the same int32 values (tests/test_known_warnings.py)",
    ),
)
"""Python warnings that are understood and harmless here; every other warning is logged (``py.warnings``)."""

KNOWN_LOG_MESSAGES: tuple[tuple[str, str, str], ...] = (
    # (logger, message prefix, why it is silenced)
    (
        "torchrec.distributed.planner.types",
        "The topology was constructed directly",
        "we build the Topology from the process group we run in; TopologyFactory is for hardware discovery",
    ),
    (
        "torchrec.distributed.planner.storage_reservations",
        "There is a known issue with TorchRec's dense tensor size",
        "same cause as the HeuristicalStorageReservation FutureWarning above",
    ),
    (
        "torchrec.distributed.utils",
        "Sharding Type is data_parallel, caching params will be ignored",
        "data_parallel tables are replicated dense tensors: there is no cache to configure",
    ),
    (
        "root",
        "Sharding spec not found for ",
        "TorchRec's planner logs this on the root logger for every data_parallel (replicated) table",
    ),
    (
        "torch.fx._symbolic_trace",
        "is_fx_tracing will return true for both",
        "TorchRec's modules call is_fx_tracing() on every forward; the deprecation is addressed to TorchRec",
    ),
)
"""Library log records (logger, message start) that are understood and harmless here."""


def human_bytes(n: float) -> str:
    """A size in the largest binary unit that keeps it >= 1, about three digits: how every message shows one.

    >>> human_bytes(0), human_bytes(900), human_bytes(31_000), human_bytes(5 * 2**30), human_bytes(3.2e13)
    ('0 B', '900 B', '30.3 KiB', '5.00 GiB', '29.1 TiB')
    """
    value, unit = float(n), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024:
            break
        value, unit = value / 1024, bigger
    if unit == "B":
        return f"{value:.0f} B"
    decimals = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2
    return f"{value:.{decimals}f} {unit}"


class _KnownMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = os.environ.get("RANK", "0")  # read per record: elastic workers set it after import
        return True


def silence_known_warnings() -> None:
    """Ignore exactly the warnings of :data:`KNOWN_WARNINGS` and the log records of :data:`KNOWN_LOG_MESSAGES`."""
    for message, category, _why in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    by_logger: dict[str, tuple[str, ...]] = {}
    for name, prefix, _why in KNOWN_LOG_MESSAGES:
        by_logger[name] = by_logger.get(name, ()) + (prefix,)
    for name, prefixes in by_logger.items():
        logger = logging.getLogger() if name == "root" else logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, _KnownMessages)]:
            logger.removeFilter(old)
        logger.addFilter(_KnownMessages(prefixes))


def configure_logging(level: str | int | bool = "INFO") -> None:
    """Log ``mlet.*`` at ``level`` (a name of :data:`LEVELS`; ``True``/``False`` mean DEBUG/INFO), the
    libraries at WARNING, every line as :data:`LOG_FORMAT` on stderr.

    Call it in every process: workers started by elastic_launch do not inherit logging or warning settings.
    """
    if isinstance(level, bool):
        level = "DEBUG" if level else "INFO"
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric, int):
        raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    handler = logging.StreamHandler()
    handler.addFilter(_RankFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=max(numeric, logging.WARNING), handlers=[handler], force=True)
    logging.getLogger("mlet").setLevel(numeric)
    logging.captureWarnings(True)
    silence_known_warnings()
