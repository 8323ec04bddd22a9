"""Single-process measurements of a finished sweep run: frequency splits, singular values, compression.

Example:
    >>> out = analyse_run("runs/sweep/x/0123abcd")      # doctest: +SKIP
    >>> sorted(out)                                     # doctest: +SKIP
    ['checkpoint', 'compression', 'freq', 'spectrum']
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlet_torchrec.config import ExperimentConfig
from mlet_torchrec.errors import UserError
from mlet_torchrec.experiments.predictions import MAX_STORED_PREDICTIONS, encode_predictions

log = logging.getLogger("mlet.sweep")


_COUNTS_CACHE: dict[tuple[str, tuple[str, ...]], dict[str, Any]] = {}


def _freq_counts(data_path: str, features: Sequence[str], batch_size: int) -> dict[str, Any]:
    """Train-split id counts per feature (cached per process and data set)."""
    cache_key = (str(Path(data_path).resolve()), tuple(features))
    if cache_key not in _COUNTS_CACHE:
        _COUNTS_CACHE[cache_key] = _count_ids(data_path, features, batch_size)
    return _COUNTS_CACHE[cache_key]


def _count_ids(data_path: str, features: Sequence[str], batch_size: int) -> dict[str, Any]:
    import torch

    from data_pipes.reader import ParquetBatchReader

    reader = ParquetBatchReader(data_path, "train", batch_size, drop_last=False, shuffle=False)
    cards = reader.meta.cardinalities()
    counts = {f: torch.zeros(cards[f], dtype=torch.int64) for f in features}
    for batch in reader:
        kjt = batch.sparse_features.to_dict()
        for f in features:
            v = kjt[f].values()
            counts[f] += torch.bincount(v, minlength=cards[f])[: cards[f]]
    source = getattr(reader.meta, "source", None)
    oov = source.get("oov_id") if isinstance(source, dict) else None
    if isinstance(oov, int):
        for f in features:  # the OOV id stands for values rarer than the converter's min_count: count it as 0
            counts[f][oov] = 0
    return counts


def _row_frequency(kjt: Any, counts: dict[str, Any], rows: int) -> Any:
    import torch

    freq = torch.full((rows,), torch.iinfo(torch.int64).max, dtype=torch.int64)
    d = kjt.to_dict()
    for f, c in counts.items():
        jt = d[f]
        lengths = jt.lengths()
        per_id = c[jt.values()]
        seg = torch.repeat_interleave(torch.arange(rows), lengths)
        row_min = torch.full((rows,), torch.iinfo(torch.int64).max, dtype=torch.int64)
        row_min.scatter_reduce_(0, seg, per_id, reduce="amin")
        freq = torch.minimum(freq, row_min)
    freq[freq == torch.iinfo(torch.int64).max] = -1  # every bag empty
    return freq


def frequency_metrics(
    model: Any,
    data_path: str,
    meta: Any,
    features: Sequence[str],
    batch_size: int,
    fraction: float = 0.1,
    scored: list[tuple[Any, Any]] | None = None,
) -> dict[str, Any]:
    """Metrics of the test rows whose rarest id is rarest (``bottom10``) and commonest (``top10``), and of all.

    Bounded memory, two passes: the first counts the test rows per frequency (no model) and fixes the
    thresholds, the second scores the rows into one metric accumulator per split. A split takes every row
    at its threshold (ties included), so it can hold a little more than ``fraction`` of the rows. ``scored``,
    when given, receives each test batch's (logits, labels) in row order.
    """
    import torch

    from data_pipes.reader import ParquetBatchReader
    from mlet_torchrec.evaluation.evaluate import score_split
    from mlet_torchrec.evaluation.metrics import MetricAccumulator

    counts = _freq_counts(data_path, features, batch_size)
    per_freq: dict[int, int] = {}
    for batch in ParquetBatchReader(data_path, "test", batch_size, drop_last=False, shuffle=False):
        values, n = torch.unique(
            _row_frequency(batch.sparse_features, counts, batch.labels.shape[0]), return_counts=True
        )
        for v, c in zip(values.tolist(), n.tolist(), strict=True):
            per_freq[v] = per_freq.get(v, 0) + c
    total = sum(per_freq.values())
    want = max(1, int(round(fraction * total)))
    low = _threshold(sorted(per_freq), per_freq, want)
    high = _threshold(sorted(per_freq, reverse=True), per_freq, want)
    accs = {name: MetricAccumulator() for name in ("all", "bottom10", "top10")}
    seen: dict[str, tuple[int | None, int | None]] = {name: (None, None) for name in ("bottom10", "top10")}
    for out in score_split([model], data_path, "test", batch_size, meta):
        if out.batch is None or not out.labels.numel():
            continue
        fq = _row_frequency(out.batch.sparse_features, counts, out.labels.numel())
        accs["all"].update(out.logits[0], out.labels)
        if scored is not None:
            scored.append((out.logits[0].detach(), out.labels.detach()))
        for name, rows in (("bottom10", fq <= low), ("top10", fq >= high)):
            if rows.any():
                accs[name].update(out.logits[0][rows], out.labels[rows])
                lo, hi = int(fq[rows].min()), int(fq[rows].max())
                prev_lo, prev_hi = seen[name]
                seen[name] = (
                    lo if prev_lo is None else min(prev_lo, lo),
                    hi if prev_hi is None else max(prev_hi, hi),
                )
    result: dict[str, Any] = {
        "features": list(features),
        "fraction": fraction,
        "rule": "min over features of train count (OOV id counts 0); ties at the threshold included",
    }
    for name, acc in accs.items():
        m = acc.result()
        keys = ("auc", "pr_auc", "logloss") if name == "all" else ("auc", "pr_auc", "logloss", "positive_rate", "rows")
        result[name] = {k: getattr(m, k) for k in keys}
        result[name]["auc_error_bound"] = m.auc_error_bound
        if name != "all":
            result[name].update(min_freq=seen[name][0], max_freq=seen[name][1])
    return result


def _threshold(order: Sequence[int], per_freq: dict[int, int], want: int) -> int:
    """The first frequency of ``order`` at which the rows counted so far reach ``want``."""
    got = 0
    for value in order:
        got += per_freq[value]
        if got >= want:
            return value
    return order[-1]


def analyse_run(
    run_dir: Path | str, freq_features: Sequence[str] | None = None, fraction: float = 0.1, compression: bool = True
) -> dict[str, Any]:
    """Single-process measurements of a finished run: frequency splits, singular values, compression."""
    import torch

    from mlet_torchrec.serving.artifact import load_artifact, mlet_module

    art = load_artifact(run_dir)
    model, config, meta, ckpt = art.materialize(), art.config, art.meta, art.path
    features = list(freq_features) if freq_features else meta.sparse_names()
    unknown = set(features) - set(meta.sparse_names())
    if unknown:
        raise UserError(f"--freq-features {sorted(unknown)} are not sparse features ({meta.sparse_names()})")
    scored: list[tuple[Any, Any]] = []
    freq = frequency_metrics(model, config.data.path, meta, features, config.train.eval_batch_size, fraction, scored)

    prefix, mlet = mlet_module(model)
    state = model.state_dict()
    spectrum = {}
    for t in mlet.embedding_bag_configs():
        w1 = state[f"{prefix}.w1.embedding_bags.{t.name}.weight"]
        w = mlet.collapse_table(t.name, w1.double()).float()
        s = torch.linalg.svdvals(w.double())
        spectrum[t.name] = {
            "rows": int(w.shape[0]),
            "d": int(w.shape[1]),
            "above_1pct": int((s > 0.01 * s[0]).sum()) if s.numel() and s[0] > 0 else 0,
            "singular_values": [float(x) for x in s],
        }
    out: dict[str, Any] = {"freq": freq, "spectrum": spectrum, "checkpoint": str(ckpt)}
    rows = sum(int(labels.numel()) for _, labels in scored)
    if 0 < rows <= MAX_STORED_PREDICTIONS:
        out["test_predictions"] = encode_predictions(
            torch.cat([logits.float() for logits, _ in scored]).numpy(), torch.cat([lb for _, lb in scored]).numpy()
        )
    if compression:
        out["compression"] = _compression(Path(run_dir), config)
    return out


def _compression(run_dir: Path, config: ExperimentConfig) -> dict[str, Any]:
    """INT8 (max-abs and grid-searched scale) of every run and low-rank SVD (ranks d/4, d/2) of the single-layer
    runs, on the test split, via :func:`~mlet_torchrec.experiments.compression.compression_study` on a collapsed
    copy of the run."""
    import tempfile

    from mlet_torchrec.experiments.compression import compression_study
    from mlet_torchrec.serving.collapse import collapse

    d = config.embedding.d
    ranks = sorted({r for r in (d // 4, d // 2) if 1 <= r < d}) if config.embedding.k is None else []
    try:
        with tempfile.TemporaryDirectory(dir=run_dir) as tmp:
            collapse(run_dir, Path(tmp) / "collapsed", None)
            rows = compression_study(Path(tmp) / "collapsed", "test", svd_ranks=ranks, int8=True)
    except Exception as e:  # noqa: BLE001 - a compression failure must not lose the training result
        log.warning("compression measurements failed: %s", e)
        return {"error": f"{type(e).__name__}: {e}"}
    out: dict[str, Any] = {}
    for row in rows:
        name = str(row["method"]).replace(f" d={d}", "").replace(" of", "")
        out[name] = {k: v for k, v in row.items() if k != "method" and isinstance(v, (int, float))}
    return out
