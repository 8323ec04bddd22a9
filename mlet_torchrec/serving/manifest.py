"""The collapse output's ``manifest.json``: what serving needs to rebuild the stock model without this package.

Example:
    >>> import pathlib, tempfile
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x"
    >>> _ = p.write_bytes(b"abc")
    >>> sha256_file(p)[:12]
    'ba7816bf8f01'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_pipes.schema import DatasetMeta
from mlet_torchrec.config import ExperimentConfig
from mlet_torchrec.files import sha256_file
from mlet_torchrec.models.configs.dlrm import DLRMConfig
from mlet_torchrec.serving.artifact import STATE_ROOT

FORMAT = "mlet-torchrec collapsed model v2"
PLAN_FILE = "plan.json"


def _pooling_name(pooling: Any) -> str:
    return str(getattr(pooling, "name", pooling)).lower()


def manifest(
    config: ExperimentConfig,
    meta: DatasetMeta,
    source: Path,
    step: int,
    extra: dict[str, Any] | None = None,
    embedding_prefix: str | None = None,
    extra_tables: dict[str, tuple[Any, str]] | None = None,
) -> dict[str, Any]:
    """What serving needs to rebuild the stock model without this package (see ``serving_doc.serving_md``).

    ``tables``: the model's d-dim tables (one stock ``EmbeddingBagCollection``, keys under
    ``state_dict.embedding_bag_collection``); ``extra_tables``: tables of other EBCs the model has
    (the DeepCTR models' first-order ``lin_*`` tables), copied unchanged, each with its full key.
    """
    from data_pipes.schema import table_name

    emb = config.embedding
    ebc = embedding_prefix or f"{STATE_ROOT}.net.sparse_arch.embedding_bag_collection."
    tables = {
        table_name(f.name): {
            "rows": f.cardinality,
            "d": emb.d,
            "features": [f.name],
            "pooling": emb.pooling,
            "dtype": "float32",
            "k": emb.k_for(f.name),
            "sigma": emb.sigma if emb.k_for(f.name) else None,
            "key": f"{ebc}embedding_bags.{table_name(f.name)}.weight",
        }
        for f in meta.sparse
    }
    ks = sorted({t["k"] for t in tables.values() if t["k"] is not None})
    source = Path(source)
    src: dict[str, Any] = {"path": str(source.resolve()), "step": step}
    if (source / ".metadata").is_file():
        src["dcp_metadata_sha256"] = sha256_file(source / ".metadata")
    out: dict[str, Any] = {
        "format": FORMAT,
        "model": config.model.name,
        "model_config": config.model.model_dump(mode="json"),
        "state_dict": {
            "root": STATE_ROOT,
            "model_prefix": f"{STATE_ROOT}.net.",
            "embedding_bag_collection": ebc,
        },
        "dense_features": meta.dense,
        "sparse_features": meta.sparse_names(),
        "d": emb.d,
        "k": ks[0] if len(ks) == 1 else (ks or None),
        "sigma": emb.sigma if ks else None,
        "tables": tables,
        "source_checkpoint": src,
        "data": config.data.path,
    }
    if isinstance(config.model, DLRMConfig):  # torchrec.models.dlrm.DLRM(ebc, **architecture)
        out["architecture"] = {
            "dense_in_features": len(meta.dense),
            "dense_arch_layer_sizes": [*config.model.bottom_mlp, emb.d],
            "over_arch_layer_sizes": [*config.model.top_mlp, 1],
        }
    if extra_tables:
        out["extra_tables"] = {
            cfg.name: {
                "rows": cfg.num_embeddings,
                "d": cfg.embedding_dim,
                "features": list(cfg.feature_names),
                "pooling": _pooling_name(cfg.pooling),
                "dtype": "float32",
                "k": None,
                "key": key,
            }
            for cfg, key in extra_tables.values()
        }
    if extra:
        out.update(extra)
    return out
