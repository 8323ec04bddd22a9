"""Collapse a trained MLET checkpoint into a plain d-dim model: W = W1 @ W2 per table.

The output is what serving loads: a DCP checkpoint of the model built on a stock TorchRec
``EmbeddingBagCollection`` of d-dim tables, a ``manifest.json`` describing the tables, and the
run's config. The command checks its own work: the collapsed model's predictions must equal the
factored model's (max abs diff <= tolerance) on the check split, and it reports that figure.

Example:
    >>> report = collapse("runs/demo/mlet", "runs/demo/mlet-collapsed")   # doctest: +SKIP
    >>> report.max_abs_diff <= 1e-5                                       # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from data_pipes.reader import ParquetBatchReader
from data_pipes.schema import DatasetMeta
from mlet_torchrec.checkpoint import load_model_state, read_checkpoint_info, resolve_checkpoint
from mlet_torchrec.config import ExperimentConfig, load_config
from mlet_torchrec.evaluate import predict
from mlet_torchrec.metrics import ctr_metrics
from mlet_torchrec.models import CTRModel, build_model
from mlet_torchrec.modules.mlet_ebc import MLETEmbeddingBagCollection

MANIFEST = "manifest.json"


class CollapseMismatch(RuntimeError):
    """The collapsed model does not reproduce the factored model's predictions."""


@dataclass
class CollapseReport:
    output: str
    source_checkpoint: str
    tables: Dict[str, Dict[str, Any]]
    serving_table_bytes: int
    check_split: Optional[str]
    rows_checked: int
    max_abs_diff: float
    tolerance: float
    collapsed_metrics: Dict[str, float] = field(default_factory=dict)


def _module_path(model: nn.Module, kind: type) -> str:
    paths = [name for name, m in model.named_modules() if isinstance(m, kind)]
    if len(paths) != 1:
        raise ValueError(f"expected one {kind.__name__} in the model, found {len(paths)}")
    return paths[0]


def collapse_state_dict(factored: CTRModel, plain: CTRModel) -> Dict[str, torch.Tensor]:
    """The plain model's state dict with every table W1 @ W2 and every other tensor copied."""
    mlet_path = _module_path(factored, MLETEmbeddingBagCollection)
    mlet: MLETEmbeddingBagCollection = factored.get_submodule(mlet_path)  # type: ignore[assignment]
    source = factored.state_dict()
    out: Dict[str, torch.Tensor] = {}
    table_prefix = f"{mlet_path}.embedding_bags."
    for key in plain.state_dict():
        if key.startswith(table_prefix):
            table = key[len(table_prefix) :].split(".")[0]
            w1 = source[f"{mlet_path}.w1.embedding_bags.{table}.weight"]
            # float64 accumulation keeps the product within float32 rounding of the training-time path
            out[key] = mlet.collapse_table(table, w1.double()).to(w1.dtype)
        else:
            out[key] = source[key]
    return out


def manifest(config: ExperimentConfig, meta: DatasetMeta, source: Path, step: int) -> Dict[str, Any]:
    from data_pipes.schema import table_name

    tables = {
        table_name(f.name): {
            "rows": f.cardinality,
            "d": config.embedding.d,
            "features": [f.name],
            "pooling": config.embedding.pooling,
            "k": config.embedding.k_for(f.name),
            "sigma": config.embedding.sigma if config.embedding.k_for(f.name) else None,
        }
        for f in meta.sparse
    }
    return {
        "format": "mlet-torchrec collapsed model v1",
        "model": config.model.name,
        "dense_features": meta.dense,
        "sparse_features": meta.sparse_names(),
        "tables": tables,
        "source_checkpoint": {"path": str(source.resolve()), "step": step},
    }


def load_factored(checkpoint: Path | str) -> Tuple[CTRModel, ExperimentConfig, DatasetMeta, Path]:
    """A training checkpoint as an unsharded factored model in this process (DCP reshards)."""
    ckpt = resolve_checkpoint(checkpoint)
    config = load_config(ckpt / "config.yaml")
    meta = DatasetMeta.load(config.data.path)
    model = build_model(config.model, config.embedding, meta)
    load_model_state(ckpt, model)
    return model.eval(), config, meta, ckpt


def load_collapsed(directory: Path | str) -> Tuple[CTRModel, ExperimentConfig, DatasetMeta]:
    """A collapse output as a plain d-dim model (stock TorchRec EBC) in this process."""
    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        raise FileNotFoundError(f"{directory}: no {MANIFEST}; is it the output of `mlet collapse`?")
    config = load_config(directory / "config.yaml")
    meta = DatasetMeta.load(config.data.path)
    model = build_model(config.model, config.embedding, meta, collapsed=True)
    load_model_state(directory, model)
    return model.eval(), config, meta


def _predict_split(model: nn.Module, config: ExperimentConfig, meta: DatasetMeta, split: str,
                   max_rows: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    batch_size = config.train.eval_batch_size
    reader = ParquetBatchReader(config.data.path, split, batch_size, drop_last=False, shuffle=False)
    steps = reader.num_batches()
    if max_rows is not None:
        steps = min(steps, max(1, -(-max_rows // batch_size)))
    return predict(model, iter(reader), steps, batch_size, meta.sparse_names(), len(meta.dense), torch.device("cpu"))


def collapse(
    checkpoint: Path | str,
    output: Path | str,
    check_split: Optional[str] = "test",
    max_check_rows: Optional[int] = None,
    tolerance: float = 1e-5,
    overwrite: bool = False,
) -> CollapseReport:
    """Collapse ``checkpoint`` into ``output`` and verify the predictions on ``check_split``."""
    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"{output} exists and is not empty (pass overwrite=True / --overwrite)")
    factored, config, meta, ckpt = load_factored(checkpoint)
    plain = build_model(config.model, config.embedding, meta, collapsed=True).eval()
    plain.load_state_dict(collapse_state_dict(factored, plain))

    rows, max_diff, metrics = 0, 0.0, {}
    if check_split is not None:
        if check_split not in meta.splits:
            raise ValueError(f"check split {check_split!r} not in data set {config.data.path} ({sorted(meta.splits)})")
        p_factored, labels = _predict_split(factored, config, meta, check_split, max_check_rows)
        p_plain, _ = _predict_split(plain, config, meta, check_split, max_check_rows)
        rows = int(labels.numel())
        max_diff = float((p_factored - p_plain).abs().max()) if rows else 0.0
        metrics = ctr_metrics(p_plain, labels).as_dict()
        if max_diff > tolerance:
            raise CollapseMismatch(
                f"collapsed predictions differ from the factored model's by {max_diff:.3g} "
                f"(> {tolerance:g}) on {rows} rows of {check_split}"
            )

    info = read_checkpoint_info(ckpt)
    man = manifest(config, meta, ckpt, int(info.get("step", -1)))
    report = CollapseReport(
        output=str(output),
        source_checkpoint=str(ckpt),
        tables=man["tables"],
        serving_table_bytes=sum(t["rows"] * t["d"] * 4 for t in man["tables"].values()),
        check_split=check_split,
        rows_checked=rows,
        max_abs_diff=max_diff,
        tolerance=tolerance,
        collapsed_metrics=metrics,
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.tmp"))
    try:
        dcp.save({"model": plain.state_dict()}, checkpoint_id=str(tmp), no_dist=True)
        (tmp / MANIFEST).write_text(json.dumps(man, indent=2))
        config.save(tmp / "config.yaml")
        (tmp / "collapse_report.json").write_text(json.dumps(asdict(report), indent=2))
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report
