"""``mlet sweep``: run a grid of training runs into a resumable results store (one JSON line per run).

    mlet sweep --config FILE --grid "embedding.d=[4,8,16] embedding.k=[none,64,128] seed=[0,1,2]" \\
        --tune-baseline "sparse_optimizer.lr=[0.2,0.8]" --results docs/results/x/results.jsonl

* **Grid**: space-separated ``key=[v1,v2,...]`` axes; each list is read as YAML (``none``/``null`` -> None);
  keys are the dotted overrides of ``mlet train``; ``seed`` means ``train.seed``. Every combination is a cell.
* **Fair baseline** (``--tune-baseline``): each cell with ``embedding.k`` null is also run with every value of
  the tuning axes (the baseline's learning-rate grid); the report picks, per (d, seed), the run with the best
  **validation** AUC (never test). Budget: MLET gets one run per k value for each (d, seed), the tuned baseline
  one run per tuning value; the sweep warns when the two counts differ (give the lr grid as many values as
  the grid has non-null k values).
* **Every method tuned** (``--tune``, instead of ``--tune-baseline``): the tuning axes run for every cell, MLET
  too, so the baseline and MLET at each k get the same learning-rate grid (equal budgets per k); the report then
  compares like with like (paper lr against paper lr, tuned against tuned). Use it when the config's learning
  rate may be far from either method's best (docs/results: 60-1000x the paper's SGD lr of 0.2 in these short runs).
* **Divergence is a result**: a run the NaN guard stops (``TrainingDiverged``: this learning rate is too large)
  is stored with ``status: diverged`` and no metrics, so a rerun skips it and the report counts it as never chosen.
* **Store**: every finished run appends one line (written, flushed and fsynced in a single ``write``) holding
  its resolved config, metrics and measurements; its key is a hash of the resolved config without ``run``
  and logging keys. A rerun skips keys already in the store, so a killed sweep resumes where it stopped.
* Each run goes in a fresh child process (``python -m mlet_torchrec.experiments.sweep --cell``) that trains (on
  ``--nproc`` ranks via ``train_local``, or in-process for 1), then, in that same process and single-process,
  loads the checkpoint and measures what the report needs (see ``analyse_run``).

Measurements in a result line:
* ``valid``/``test``: AUC, LogLoss, PR-AUC of the trained model (rank 0's summary of ``train``).
* ``freq``: test rows ranked by the train-split frequency of their ids. A row's frequency is the **minimum**
  over the frequency features (default: every sparse feature; ``--freq-features`` picks some, e.g. the item
  for MovieLens) of the train count of its id (multi-hot: min over the bag; empty bags are skipped; ids
  unseen in train, and the converters' OOV id (values rarer than ``--min-count``), count 0). ``top10``/``bottom10``: AUC/PR-AUC/positive rate on the 10% of test rows with
  the highest/lowest frequency (ties broken by row order of the test split).
* ``peak_rss_mb``: max resident set size of the training process(es): with ``nproc > 1`` the
  ``RUSAGE_CHILDREN`` max RSS of the cell process (= the largest of its training workers, read right after
  ``train_local`` returns); with ``nproc == 1`` the cell process's own ``RUSAGE_SELF`` max RSS read right after
  training, before the analysis.
* ``seconds_per_iter``: ``train_seconds / steps`` (training loop only, no startup or final eval).
* ``spectrum``: per table, the singular values of the collapsed W = W1 @ W2 (W1 for the baseline) and the
  count above 1% of the largest.
* ``compression``: test AUC/LogLoss and relative table size (paper A.4.4) of the collapsed model in FP32, INT8
  (max-abs and grid scale) and, for single-layer runs, rank d/4 and d/2 SVD, from
  ``mlet_torchrec.serving.compression.compression_study`` when that module exists (``--no-compression`` skips it).
  Hashing needs its own training runs on a hashed data set, so it is not measured per cell.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from mlet_torchrec.config import ConfigError, ExperimentConfig, load_config

log = logging.getLogger("mlet.sweep")

ALIASES = {"seed": "train.seed", "d": "embedding.d", "k": "embedding.k", "lr": "sparse_optimizer.lr"}
# Keys that do not change what a run computes: left out of the cell key.
_KEY_EXCLUDE = {("run",), ("train", "progress"), ("train", "log_every"), ("data", "num_workers")}
STORE_VERSION = 1


# ------------------------------------------------------------------------------------------------ grid


def _yaml_value(raw: str) -> Any:
    if raw.strip().lower() in ("none", "~"):
        return None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"grid value {raw!r} is not valid YAML: {e}") from e


def parse_grid(text: str) -> Dict[str, List[Any]]:
    """``"embedding.d=[4,8] embedding.k=[none,64] seed=[0,1]"`` -> ordered {key: values}.

    Axes are separated by whitespace outside brackets; a value without brackets is a one-value axis;
    list items may be ``none``/``null``. ``seed``, ``d``, ``k``, ``lr`` are short for ``train.seed``,
    ``embedding.d``, ``embedding.k``, ``sparse_optimizer.lr``.
    """
    grid: Dict[str, List[Any]] = {}
    text = (text or "").strip()
    pos = 0
    pattern = re.compile(r"\s*([A-Za-z_][\w.]*)\s*=\s*(\[[^\]]*\]|[^\s\[\]]+)\s*")
    while pos < len(text):
        m = pattern.match(text, pos)
        if not m:
            raise ConfigError(f"grid: cannot read {text[pos:]!r}; expected key=[v1,v2,...] separated by spaces")
        key, raw = ALIASES.get(m.group(1), m.group(1)), m.group(2)
        if raw.startswith("["):
            items = [s for s in (x.strip() for x in raw[1:-1].split(",")) if s]
            values = [_yaml_value(s) for s in items]
        else:
            values = [_yaml_value(raw)]
        if not values:
            raise ConfigError(f"grid: axis {key} has no values")
        if key in grid:
            raise ConfigError(f"grid: axis {key} given twice")
        if len(set(map(json.dumps, values))) != len(values):
            raise ConfigError(f"grid: axis {key} repeats a value: {values}")
        grid[key] = values
        pos = m.end()
    return grid


def format_override(key: str, value: Any) -> str:
    return f"{key}={'null' if value is None else json.dumps(value)}"


def expand_grid(grid: Dict[str, List[Any]]) -> List[Dict[str, Any]]:
    """Every combination of the axes, the last axis varying fastest."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def _strip(d: Dict[str, Any], path: Tuple[str, ...] = ()) -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        p = path + (k,)
        if p in _KEY_EXCLUDE:
            continue
        out[k] = _strip(v, p) if isinstance(v, dict) else v
    return out


def cell_key(config: ExperimentConfig) -> str:
    """Hash of the resolved config, without the run section and logging keys."""
    canon = json.dumps(_strip(config.model_dump(mode="json")), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


@dataclass
class Cell:
    overrides: Dict[str, Any]
    """The grid (and tuning) values of this run, dotted keys."""
    role: str
    """'grid' (a cell of the grid) or 'tune' (an extra run of the tuning grid)."""
    config: ExperimentConfig
    key: str = ""
    tags: Dict[str, Any] = field(default_factory=dict)

    def label(self) -> str:
        return " ".join(format_override(k, v) for k, v in self.overrides.items())


def plan_cells(
    config_path: Optional[str],
    grid: Dict[str, List[Any]],
    tune: Dict[str, List[Any]],
    base_overrides: Sequence[str] = (),
    runs_dir: str = "runs/sweep",
    tune_mlet: bool = False,
) -> List[Cell]:
    """The cells of a sweep, de-duplicated by key (a tuning value equal to the base value is one run).

    The tuning axes are run for the baseline (k=null) cells, and for every cell when ``tune_mlet``."""
    cells: List[Cell] = []
    seen: set = set()

    def add(ov: Dict[str, Any], role: str) -> None:
        overrides = list(base_overrides) + [format_override(k, v) for k, v in ov.items()]
        config = load_config(config_path, overrides)
        key = cell_key(config)
        if key in seen:
            return
        seen.add(key)
        config.run.dir = str(Path(runs_dir) / key)
        config.run.resume = False
        config.train.progress = False
        cells.append(Cell(overrides=ov, role=role, config=config, key=key))

    for ov in expand_grid(grid):  # a baseline cell's tuning runs follow it, so a cut-short sweep stays usable
        add(ov, "grid")
        if not tune:
            continue
        k = load_config(config_path, list(base_overrides) + [format_override(k, v) for k, v in ov.items()]).embedding.k
        if k is not None and not tune_mlet:
            continue
        for tv in expand_grid(tune):
            add({**ov, **tv}, "tune")
    return cells


def budget_note(grid: Dict[str, List[Any]], tune: Dict[str, List[Any]], tune_mlet: bool = False) -> str:
    ks = [k for k in grid.get("embedding.k", [None]) if k is not None]
    n_tune = len(expand_grid(tune)) if tune else 1
    axes = ", ".join(tune) or "nothing"
    if tune_mlet:
        return (f"per (d, seed): every method (the baseline and MLET at each k in {ks}) gets the same {n_tune} "
                f"tuning run(s) (one per value of {axes}) plus its run at the config's values")
    return (f"per (d, seed): MLET {len(ks)} run(s) (one per k in {ks}); tuned baseline {n_tune} run(s) "
            f"(one per value of {axes})")


# ------------------------------------------------------------------------------------------------ store


class ResultsStore:
    """Append-only JSON-lines file; a line is written with one ``os.write`` then fsynced."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def load(self) -> List[Dict[str, Any]]:
        return load_results(self.path)

    def done_keys(self) -> set:
        return {r["key"] for r in self.load() if r.get("status") in ("ok", "diverged")}

    def append(self, record: Dict[str, Any]) -> None:
        line = (json.dumps(record, sort_keys=True, default=_json_default) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                # a killed writer can leave a partial last line: start on a fresh line then
                size = os.fstat(fd).st_size
                if size:
                    with open(self.path, "rb") as f:
                        f.seek(size - 1)
                        if f.read(1) != b"\n":
                            line = b"\n" + line
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "as_dict"):
        return o.as_dict()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load_results(path: Path | str) -> List[Dict[str, Any]]:
    """Every complete line of a store (a torn last line from an interrupted write is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: skipping an incomplete line", path, n)
            continue
        if isinstance(rec, dict) and "key" in rec:
            out.append(rec)
    return out


# ------------------------------------------------------------------------------------------------ analysis


_COUNTS_CACHE: Dict[Tuple[str, Tuple[str, ...]], Dict[str, Any]] = {}


def _freq_counts(data_path: str, features: Sequence[str], batch_size: int) -> Dict[str, "Any"]:
    """Train-split id counts per feature (cached per process and data set)."""
    cache_key = (str(Path(data_path).resolve()), tuple(features))
    if cache_key not in _COUNTS_CACHE:
        _COUNTS_CACHE[cache_key] = _count_ids(data_path, features, batch_size)
    return _COUNTS_CACHE[cache_key]


def _count_ids(data_path: str, features: Sequence[str], batch_size: int) -> Dict[str, "Any"]:
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
    oov = (reader.meta.source or {}).get("oov_id") if isinstance(getattr(reader.meta, "source", None), dict) else None
    if oov is not None:
        for f in features:  # the OOV id stands for values rarer than the converter's min_count: count it as 0
            counts[f][int(oov)] = 0
    return counts


def _row_frequency(kjt: Any, counts: Dict[str, Any], rows: int) -> "Any":
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


def analyse_run(run_dir: Path | str, freq_features: Optional[Sequence[str]] = None,
                fraction: float = 0.1, compression: bool = True) -> Dict[str, Any]:
    """Single-process measurements of a finished run: frequency splits, singular values, compression."""
    import torch

    from data_pipes.reader import ParquetBatchReader
    from mlet_torchrec.serving.collapse import _module_path, load_factored
    from mlet_torchrec.evaluation.metrics import ctr_metrics
    from mlet_torchrec.modules.mlet_ebc import MLETEmbeddingBagCollection

    model, config, meta, ckpt = load_factored(run_dir)
    features = list(freq_features) if freq_features else meta.sparse_names()
    unknown = set(features) - set(meta.sparse_names())
    if unknown:
        raise ValueError(f"--freq-features {sorted(unknown)} are not sparse features ({meta.sparse_names()})")
    bs = config.train.eval_batch_size
    counts = _freq_counts(config.data.path, features, bs)
    reader = ParquetBatchReader(config.data.path, "test", bs, drop_last=False, shuffle=False)
    probs, labels, freqs = [], [], []
    with torch.no_grad():
        for batch in reader:
            logits = model(batch.dense_features, batch.sparse_features)
            probs.append(torch.sigmoid(logits.float().reshape(-1)))
            labels.append(batch.labels.float())
            freqs.append(_row_frequency(batch.sparse_features, counts, batch.labels.shape[0]))
    p, y, fq = torch.cat(probs), torch.cat(labels), torch.cat(freqs)
    order = torch.argsort(fq, stable=True)
    n = max(1, int(round(fraction * len(order))))
    splits = {}
    for name, idx in (("bottom10", order[:n]), ("top10", order[-n:])):
        m = ctr_metrics(p[idx], y[idx])
        splits[name] = {"auc": m.auc, "pr_auc": m.pr_auc, "logloss": m.logloss, "positive_rate": m.positive_rate,
                        "rows": m.rows, "min_freq": int(fq[idx].min()), "max_freq": int(fq[idx].max())}
    all_m = ctr_metrics(p, y)
    freq = {"features": features, "rule": "min over features of train count (OOV id counts 0)", "fraction": fraction,
            "all": {"auc": all_m.auc, "pr_auc": all_m.pr_auc, "logloss": all_m.logloss}, **splits}

    mlet: MLETEmbeddingBagCollection = model.get_submodule(_module_path(model, MLETEmbeddingBagCollection))
    state = model.state_dict()
    prefix = _module_path(model, MLETEmbeddingBagCollection)
    spectrum = {}
    for t in mlet.embedding_bag_configs():
        w1 = state[f"{prefix}.w1.embedding_bags.{t.name}.weight"]
        w = mlet.collapse_table(t.name, w1.double()).float()
        s = torch.linalg.svdvals(w.double())
        spectrum[t.name] = {"rows": int(w.shape[0]), "d": int(w.shape[1]),
                            "above_1pct": int((s > 0.01 * s[0]).sum()) if s.numel() and s[0] > 0 else 0,
                            "singular_values": [float(x) for x in s]}
    out: Dict[str, Any] = {"freq": freq, "spectrum": spectrum, "checkpoint": str(ckpt)}
    comp = _compression(Path(run_dir), config) if compression else None
    if comp is not None:
        out["compression"] = comp
    return out


def _compression(run_dir: Path, config: ExperimentConfig) -> Optional[Dict[str, Any]]:
    """INT8 (max-abs and grid-searched scale) of every run and low-rank SVD (ranks d/4, d/2) of the single-layer
    runs, on the test split, via ``mlet_torchrec.serving.compression.compression_study`` on a collapsed copy of the run;
    None while that module does not exist."""
    try:
        from mlet_torchrec.serving import compression  # type: ignore[attr-defined]
    except ImportError:
        return None
    study = getattr(compression, "compression_study", None)
    if study is None:
        return None
    import tempfile

    from mlet_torchrec.serving.collapse import collapse

    d = config.embedding.d
    ranks = sorted({r for r in (d // 4, d // 2) if 1 <= r < d}) if config.embedding.k is None else []
    try:
        with tempfile.TemporaryDirectory(dir=run_dir) as tmp:
            collapse(run_dir, Path(tmp) / "collapsed", None)
            rows = study(Path(tmp) / "collapsed", "test", svd_ranks=ranks, int8=True)
    except Exception as e:  # noqa: BLE001 - a compression failure must not lose the training result
        log.warning("compression measurements failed: %s", e)
        return {"error": f"{type(e).__name__}: {e}"}
    out: Dict[str, Any] = {}
    for row in rows:
        name = str(row["method"]).replace(f" d={d}", "").replace(f" of", "")
        out[name] = {k: v for k, v in row.items() if k != "method" and isinstance(v, (int, float))}
    return out


# ------------------------------------------------------------------------------------------------ one cell


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM (Linux: ``5`` into /proc/self/clear_refs); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vm_hwm_kb() -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def run_cell_here(config: ExperimentConfig, nproc: int, freq_features: Optional[Sequence[str]],
                  shared_process: bool = False, compression: bool = True) -> Dict[str, Any]:
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


def _measure_cell(config: ExperimentConfig, nproc: int, freq_features: Optional[Sequence[str]],
                  shared_process: bool, compression: bool) -> Dict[str, Any]:
    t0 = time.time()
    if shared_process:
        if nproc != 1:
            raise ValueError("in-process cells train on one process (--nproc 1)")
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
    Path(spec["output"]).write_text(json.dumps(out, default=_json_default))
    return 0


# ------------------------------------------------------------------------------------------------ sweep


@dataclass
class SweepSettings:
    config: Optional[str]
    grid: Dict[str, List[Any]]
    tune: Dict[str, List[Any]] = field(default_factory=dict)
    tune_mlet: bool = False  # run the tuning axes for the MLET cells too (every method tuned alike)
    results: str = "results.jsonl"
    base_overrides: List[str] = field(default_factory=list)
    nproc: int = 2
    parallel: int = 1
    runs_dir: Optional[str] = None
    freq_features: Optional[List[str]] = None
    keep_runs: bool = False
    dataset: Optional[str] = None
    dry_run: bool = False
    in_process: bool = False
    compression: bool = True
    cell_timeout: Optional[float] = None


def _run_cell_subprocess(cell: Cell, s: SweepSettings, work: Path) -> Dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    spec = work / f"{cell.key}.spec.json"
    out = work / f"{cell.key}.out.json"
    logf = work / f"{cell.key}.log"
    out.unlink(missing_ok=True)
    spec.write_text(json.dumps({"config": cell.config.model_dump(mode="json"), "nproc": s.nproc,
                                "freq_features": s.freq_features, "output": str(out),
                                "compression": s.compression}))
    with open(logf, "w") as lf:
        proc = subprocess.run([sys.executable, "-m", "mlet_torchrec.experiments.sweep", "--cell", str(spec)],
                              stdout=lf, stderr=subprocess.STDOUT, timeout=s.cell_timeout)
    if proc.returncode != 0 or not out.exists():
        tail = logf.read_text()[-2000:]
        raise RuntimeError(f"cell {cell.key} ({cell.label()}) failed with exit code {proc.returncode}; "
                           f"log {logf}:\n{tail}")
    return json.loads(out.read_text())


def _data_hashing(data_path: str) -> Optional[Dict[str, Any]]:
    """The hashing a data set was made with (``python -m mlet_torchrec.serving.compression hash``), None if un-hashed."""
    from data_pipes.schema import DatasetMeta

    try:
        source = DatasetMeta.load(data_path).source
    except FileNotFoundError:  # only in tests that fake the training; a trained cell's data is there
        return None
    return source.get("hashing") if isinstance(source, dict) else None


def run_sweep(s: SweepSettings) -> Dict[str, int]:
    """Run every cell not yet in the store; returns counts {planned, skipped, ran, failed}."""
    store = ResultsStore(s.results)
    runs_dir = s.runs_dir or str(Path("runs/sweep") / Path(s.results).parent.name)
    cells = plan_cells(s.config, s.grid, s.tune, s.base_overrides, runs_dir, s.tune_mlet)
    done = store.done_keys()
    todo = [c for c in cells if c.key not in done]
    note = budget_note(s.grid, s.tune, s.tune_mlet)
    ks = [k for k in s.grid.get("embedding.k", [None]) if k is not None]
    if s.tune and not s.tune_mlet and len(expand_grid(s.tune)) != len(ks):
        log.warning("budget not matched: %s", note)
    print(f"sweep: {len(cells)} runs planned, {len(cells) - len(todo)} already in {s.results}, {len(todo)} to run; "
          f"budget {note}", flush=True)
    if s.dry_run:
        for c in todo:
            print(f"  {c.key} [{c.role}] {c.label()}")
        return {"planned": len(cells), "skipped": len(cells) - len(todo), "ran": 0, "failed": 0}
    dataset = s.dataset or Path(cells[0].config.data.path).name if cells else s.dataset
    work = Path(runs_dir) / "_cells"
    counts = {"planned": len(cells), "skipped": len(cells) - len(todo), "ran": 0, "failed": 0}
    lock = threading.Lock()

    def one(i_cell: Tuple[int, Cell]) -> None:
        i, cell = i_cell
        t0 = time.time()
        print(f"[{i + 1}/{len(todo)}] {cell.key} [{cell.role}] {cell.label()} ...", flush=True)
        try:
            if s.in_process:
                meas = run_cell_here(cell.config, s.nproc, s.freq_features, shared_process=True,
                                     compression=s.compression)
            else:
                meas = _run_cell_subprocess(cell, s, work)
        except Exception as e:  # noqa: BLE001 - report and go on with the other cells
            print(f"[{i + 1}/{len(todo)}] {cell.key} FAILED: {e}", flush=True)
            with lock:
                counts["failed"] += 1
            return
        record = {
            "version": STORE_VERSION, "key": cell.key, "status": meas.pop("status", "ok"), "role": cell.role,
            "dataset": dataset, "overrides": cell.overrides, "base_config": s.config,
            "base_overrides": list(s.base_overrides), "grid": s.grid, "tune": s.tune,
            "tune_mlet": s.tune_mlet, "budget": note,
            "nproc": s.nproc, "parallel": s.parallel,
            "d": cell.config.embedding.d, "k": cell.config.embedding.k, "seed": cell.config.train.seed,
            "sparse_lr": cell.config.sparse_optimizer.lr, "dense_lr": cell.config.dense_optimizer.lr,
            "config": cell.config.model_dump(mode="json"), "data_hashing": _data_hashing(cell.config.data.path),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_seconds": time.time() - t0,
            **meas,
        }
        store.append(record)
        if not s.keep_runs:
            shutil.rmtree(cell.config.run.dir, ignore_errors=True)
        t = record.get("test") or {}
        outcome = ("diverged (recorded; a rerun skips it)" if record["status"] == "diverged" else
                   f"test AUC {t.get('auc', float('nan')):.4f} LogLoss {t.get('logloss', float('nan')):.4f}")
        print(f"[{i + 1}/{len(todo)}] {cell.key} done in {record['wall_seconds']:.0f}s: {outcome}", flush=True)
        with lock:
            counts["ran"] += 1

    if s.in_process and (s.nproc != 1 or s.parallel != 1):
        raise ValueError("--in-process needs --nproc 1 and --parallel 1")
    if s.parallel > 1:
        with ThreadPoolExecutor(max_workers=s.parallel) as ex:
            list(ex.map(one, enumerate(todo)))
    else:
        for item in enumerate(todo):
            one(item)
    print(f"sweep: {counts}", flush=True)
    return counts


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--cell":
        sys.exit(_cell_main(sys.argv[2:]))
    print("usage: mlet sweep ... (this module's own entry point is internal: --cell SPEC)", file=sys.stderr)
    sys.exit(2)
