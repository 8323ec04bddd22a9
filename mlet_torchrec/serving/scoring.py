"""What scores a split: a run, a collapse output or an export, resolved once, and ``mlet evaluate`` on it.

:func:`resolve_scorer` turns a path into a :class:`Scorer`: a training run (or checkpoint) or a collapse
output (FP32, sharded over the job's ranks by TorchRec's planner, see
:func:`~mlet_torchrec.serving.artifact.shard_for_job`), or an export dir (its INT8 TorchScript model, or the
FP32 one: every export holds both, whole in every rank). :func:`check_data` accepts a data set other than the
model's own when it holds the same features: the same feature transform identity when both record one
(:mod:`data_pipes.transform`), else the same features and cardinalities. :func:`evaluate_path` is
``mlet evaluate`` on any of them and any such data set; ``mlet predict`` (:mod:`.predict`) scores with the
same pieces.

Example:
    >>> evaluate_path("runs/tiny/export", "test", data="data/new", precision="fp32")["auc"]   # doctest: +SKIP
    0.7312
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data_pipes.schema import METADATA_FILE, DatasetMeta
from data_pipes.transform import dataset_identity, ref_identity
from mlet_torchrec.config import ExperimentConfig, load_config
from mlet_torchrec.errors import UserError
from mlet_torchrec.evaluation.evaluate import eval_device, evaluate_split
from mlet_torchrec.options import AUC_MODES, PRECISIONS
from mlet_torchrec.serving.artifact import MANIFEST, load_artifact, read_manifest, shard_for_job
from mlet_torchrec.serving.torchrec_package import DictLogits, load_predict_module


@dataclass(frozen=True)
class Scorer:
    """What scores the rows: a run or collapse (sharded over the job) or an export's TorchScript model."""

    path: Path
    kind: str  # "run", "collapsed" or "export"
    precision: str
    config: ExperimentConfig
    dense: list[str]
    sparse: list[tuple[str, int]]  # (feature, cardinality), in the model's order
    transform_identity: str | None
    model_file: Path | None = None  # export: the TorchScript file


def _export_scorer(path: Path, precision: str | None) -> Scorer:
    man = read_manifest(path)
    modules = man["predict_modules"]
    precision = precision or ("int8" if "int8" in modules else "fp32")
    if precision not in modules:
        raise UserError(f"{path}: an export without the {precision} model; export the collapse again with --int8")
    by_feature = {f: t["rows"] for t in man["tables"].values() for f in t["features"]}
    return Scorer(
        path=path,
        kind="export",
        precision=precision,
        config=load_config(path / "config.yaml"),
        dense=list(man["dense_features"]),
        sparse=[(f, int(by_feature[f])) for f in man["sparse_features"]],
        transform_identity=man.get("transform_identity"),
        model_file=path / Path(modules[precision]["file"]).name,
    )


def resolve_scorer(path: Path | str, precision: str | None = None) -> Scorer:
    """The scorer at ``path``: an export dir (INT8 unless ``precision="fp32"``), a collapse output, or a run
    (or checkpoint) directory (both FP32 only)."""
    path = Path(path)
    if precision is not None and precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    man = read_manifest(path) if (path / MANIFEST).is_file() else None
    if man is not None and "predict_modules" in man:
        return _export_scorer(path, precision)
    if precision == "int8":
        raise UserError(f"{path}: --precision int8 needs an export dir (mlet export --int8); this is FP32")
    art = load_artifact(path)
    meta = art.meta
    sparse = [(f.name, f.cardinality) for f in meta.sparse]
    if art.kind == "collapsed":
        identity = art.info.get("transform_identity")
    else:
        identity = ref_identity(path) or ref_identity(art.path.parent.parent)
    kind = "collapsed" if art.kind == "collapsed" else "run"
    return Scorer(path, kind, "fp32", art.config, list(meta.dense), sparse, identity)


def check_data(scorer: Scorer, data: Path | str, split: str) -> DatasetMeta:
    """The data set's metadata, once it is known to hold ``split`` and the features the model was trained on."""
    if not (Path(data) / METADATA_FILE).is_file():
        if Path(data) == Path(scorer.config.data.path):
            raise UserError(
                f"{scorer.path} was trained on {data} (from the run config), which is not there; pass --data"
            )
        raise UserError(f"--data {data}: no {METADATA_FILE}; is it a converted data set?")
    meta = DatasetMeta.load(data)
    if split not in meta.splits:
        raise UserError(f"data set {data} has no split {split!r} ({', '.join(sorted(meta.splits))})")
    theirs = dataset_identity(data)
    if scorer.transform_identity and theirs and theirs != scorer.transform_identity:
        raise UserError(
            f"--data {data}: its feature transform ({theirs[:12]}) is not the one {scorer.path} was trained with "
            f"({scorer.transform_identity[:12]}); convert the raw data with --features-from {scorer.path}"
        )
    if meta.dense != scorer.dense or [(f.name, f.cardinality) for f in meta.sparse] != scorer.sparse:
        raise UserError(
            f"--data {data}: its features or cardinalities differ from those {scorer.path} was trained on; "
            f"convert the raw data with --features-from {scorer.path}"
        )
    return meta


def scorer_model(scorer: Scorer, world_size: int, device: torch.device) -> nn.Module:
    if scorer.model_file is not None:
        return DictLogits(load_predict_module(scorer.model_file)).eval()
    return shard_for_job(load_artifact(scorer.path), device, world_size)


def evaluate_path(
    path: str | Path,
    split: str = "test",
    auc: str = "histogram",
    max_rows: int | None = None,
    data: str | Path | None = None,
    precision: str | None = None,
) -> dict[str, Any]:
    """Metrics of a run (or checkpoint), a collapse output or an export on ``split`` of ``data`` (default:
    the model's own data set).

    In one process, or as one rank of a job (torchrun, TorchX, ``mlet evaluate --nproc-per-node``): every rank
    loads its shards (an export: the whole model), scores its slice of the split, and every rank returns
    the same metrics.
    """
    from mlet_torchrec.training.distributed import process_group

    if auc not in AUC_MODES:
        raise UserError(f"--auc {auc!r} is not one of {', '.join(AUC_MODES)}")
    scorer = resolve_scorer(path, precision)
    data = str(data if data is not None else scorer.config.data.path)
    meta = check_data(scorer, data, split)
    with process_group(scorer.config.run.device) as ctx:
        model = scorer_model(scorer, ctx.world_size, eval_device())
        batch = scorer.config.train.eval_batch_size
        metrics = evaluate_split(model, data, split, batch, meta, max_rows, ctx.rank, ctx.world_size, auc)
    model_path = str(scorer.model_file or scorer.path)
    return {"model": model_path, "kind": scorer.kind, "data": data, "split": split, **metrics.as_dict()}


__all__ = ["Scorer", "check_data", "evaluate_path", "resolve_scorer", "scorer_model"]
