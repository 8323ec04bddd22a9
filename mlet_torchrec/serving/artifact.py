"""A trained artifact on disk, resolved once: a training checkpoint (or its run dir) or a collapse output.

:func:`load_artifact` reads the config, the data set's metadata, the checkpoint's step and world size
and builds the model's structure (W1 on the meta device, so nothing large is allocated); every later
step (collapse's planning and product, its prediction check, ``mlet evaluate``, the compression study,
the sweep's analysis) takes this one object instead of resolving the path again.
:meth:`Artifact.materialize` loads the weights into that same model in this process;
:meth:`Artifact.shard` loads them into a TorchRec-sharded version of it on every rank of a job.

Example:
    >>> art = load_artifact("runs/demo/mlet")            # doctest: +SKIP
    >>> art.kind, art.step                              # doctest: +SKIP
    ('checkpoint', 400)
    >>> model = art.materialize()                       # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from data_pipes.schema import METADATA_FILE, DatasetMeta, SparseFeature
from mlet_torchrec.config import ExperimentConfig, load_config
from mlet_torchrec.errors import InputNotFound, UserError
from mlet_torchrec.files import sha256_file
from mlet_torchrec.models.registry import CTRModel, build_model
from mlet_torchrec.modules.mlet_ebc import MLETEmbeddingBagCollection
from mlet_torchrec.names import check_name
from mlet_torchrec.training.checkpoint import load_model_state, read_checkpoint_info
from mlet_torchrec.training.locks import CheckpointPin
from mlet_torchrec.training.run_dir import pinned_checkpoint
from mlet_torchrec.training.safe_dcp import DCP_METADATA, METADATA_SHA256, read_metadata

MANIFEST = "manifest.json"
STATE_ROOT = "model"  # every DCP state dict of the project is {"model": model.state_dict()}


class ManifestError(UserError):
    """A ``manifest.json`` that is truncated, crafted or does not match the tensors beside it."""


class ManifestTable(BaseModel):
    """The fields of one ``manifest.json`` table entry that shape files and memory: checked before use."""

    model_config = ConfigDict(extra="allow")

    rows: StrictInt = Field(gt=0)
    d: StrictInt = Field(gt=0)
    features: list[str]
    key: str


def read_manifest(collapsed: Path | str) -> dict[str, Any]:
    """The ``manifest.json`` of a collapse (or export) output, checked as untrusted data.

    Every table name must be a plain file name (:func:`mlet_torchrec.io.check_name`), rows and widths
    positive integers; beside a DCP ``.metadata``, its SHA-256 must be the recorded one and every
    table's shape the one DCP holds. Anything else is a one-line :class:`ManifestError`.
    """
    path = Path(collapsed) / MANIFEST
    if not path.is_file():
        raise InputNotFound(f"{collapsed}: no {MANIFEST}; is it the output of `mlet collapse`?")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ManifestError(f"{path}: unreadable ({type(e).__name__}: {e}); collapse the checkpoint again") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("tables"), dict) or not manifest["tables"]:
        raise ManifestError(f"{path}: not a collapse manifest (no tables)")
    tables: dict[str, ManifestTable] = {}
    for group in ("tables", "extra_tables"):
        for name, entry in (manifest.get(group) or {}).items():
            check_name(name, f"{path}: table name")
            try:
                tables[name] = ManifestTable.model_validate(entry)
            except ValidationError as e:
                first = e.errors()[0]
                where = ".".join(str(x) for x in first["loc"])
                raise ManifestError(f"{path}: {group}.{name}.{where}: {first['msg']}") from None
    if (Path(collapsed) / DCP_METADATA).is_file():
        _check_against_dcp(Path(collapsed), path, manifest, tables)
    return manifest


def _check_against_dcp(collapsed: Path, path: Path, manifest: dict[str, Any], tables: dict[str, ManifestTable]) -> None:
    """The recorded ``.metadata`` hash and every table's (rows, d) against the DCP metadata."""
    recorded = manifest.get(METADATA_SHA256)
    if recorded is not None and recorded != sha256_file(collapsed / DCP_METADATA):
        raise ManifestError(f"{path}: {collapsed / DCP_METADATA} does not match the SHA-256 the manifest records")
    stored = read_metadata(collapsed).state_dict_metadata
    for name, t in tables.items():
        found = stored.get(t.key)
        if not isinstance(found, TensorStorageMetadata):
            raise ManifestError(f"{path}: table {name}: the checkpoint beside it has no tensor {t.key}")
        if tuple(found.size) != (t.rows, t.d):
            raise ManifestError(
                f"{path}: table {name} says {t.rows} x {t.d} but the checkpoint beside it holds {tuple(found.size)}"
            )


def meta_from_manifest(man: dict[str, Any]) -> DatasetMeta:
    """The model-shaping part of the data set's metadata (features, cardinalities), from the manifest."""
    by_feature = {f: t["rows"] for t in man["tables"].values() for f in t["features"]}
    return DatasetMeta(
        dense=list(man["dense_features"]),
        sparse=[SparseFeature(name=f, cardinality=by_feature[f]) for f in man["sparse_features"]],
        splits={},
    )


@dataclass
class Artifact:
    """One resolved artifact: where it is, what it was trained on, and its model (weights not yet loaded)."""

    path: Path  # the checkpoint directory, or the collapse output
    kind: str  # "checkpoint" (factored, as trained) or "collapsed" (stock d-dim EBC)
    config: ExperimentConfig
    meta: DatasetMeta
    model: CTRModel  # the structure: tables on the meta device until materialize() / shard()
    info: dict[str, Any] = field(default_factory=dict)  # checkpoint.json (step, world_size) or the manifest
    loaded: bool = False
    pin: CheckpointPin | None = None  # held while the artifact lives: see mlet_torchrec.training.locks

    @property
    def step(self) -> int:
        if self.kind == "collapsed":
            return int(self.info.get("source_checkpoint", {}).get("step", -1))
        return int(self.info.get("step", -1))

    @property
    def world_size(self) -> int:
        """The world size that wrote the checkpoint (its DCP chunks follow that job's sharding)."""
        return int(self.info.get("world_size", 1))

    def materialize(self) -> CTRModel:
        """The model with its weights, read by this process alone (no collective, in a job too; DCP reshards
        whatever wrote it); idempotent."""
        if not self.loaded:
            _allocate_meta(self.model)
            load_model_state(self.path, self.model, no_dist=True)
            self.loaded = True
        return self.model.eval()

    def shard(self, constraints: dict[str, Any], device: torch.device) -> nn.Module:
        """Collective: the model sharded by TorchRec's planner over the job, this rank's shards loaded."""
        import torch.distributed as dist
        from torchrec.distributed.model_parallel import DistributedModelParallel
        from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology

        from mlet_torchrec.training.distributed import MLETEmbeddingBagCollectionSharder
        from mlet_torchrec.training.guardrails import collective_plan, quiet_planner

        if self.loaded:
            raise ValueError(f"{self.path}: the model was materialized in this process; load the artifact again")
        sharders = [MLETEmbeddingBagCollectionSharder()]
        topology = Topology(world_size=dist.get_world_size(), compute_device=device.type)
        with quiet_planner():
            plan = collective_plan(
                EmbeddingShardingPlanner(topology=topology, constraints=constraints), self.model, sharders
            )
        sharded = DistributedModelParallel(module=self.model, device=device, plan=plan, sharders=sharders)
        load_model_state(self.path, sharded)
        self.loaded = True
        model: nn.Module = sharded.eval()
        return model


def _allocate_meta(model: nn.Module) -> None:
    """Give every meta-device tensor (the tables) CPU storage; the state dict load then fills them.

    Not ``to_empty``: that would also blank the non-persistent buffers (DLRM's interaction indices),
    which no checkpoint holds.
    """
    cpu = torch.device("cpu")
    for m in model.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_meta:
                m._parameters[name] = nn.Parameter(torch.empty_like(p, device=cpu), requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_meta:
                if name in m._non_persistent_buffers_set:
                    raise ValueError(f"{type(m).__name__}.{name}: a non-persistent buffer on the meta device")
                m._buffers[name] = torch.empty_like(b, device=cpu)
        if getattr(getattr(m, "_device", None), "type", None) == "meta":
            # TorchRec's EBCs remember the device they were built on; torch types every dynamic Module
            # attribute as Tensor | Module
            m._device = cpu  # type: ignore[assignment]


def load_artifact(path: Path | str) -> Artifact:
    """Resolve ``path`` (a checkpoint, its run directory, or a collapse output) into an :class:`Artifact`.

    A collapse output whose data set is not on this machine still loads (its features come from the
    manifest); evaluating it needs the data.
    """
    path = Path(path)
    meta_dev = torch.device("meta")
    if (path / MANIFEST).is_file():
        man = read_manifest(path)
        config = load_config(path / "config.yaml")
        has_data = (Path(config.data.path) / METADATA_FILE).is_file()
        meta = DatasetMeta.load(config.data.path) if has_data else meta_from_manifest(man)
        model = build_model(config.model, config.embedding, meta, device=meta_dev, collapsed=True)
        return Artifact(path, "collapsed", config, meta, model, man)
    ckpt, held = pinned_checkpoint(path)  # a live run's rotation cannot remove it while this artifact lives
    config = load_config(ckpt / "config.yaml")
    meta = DatasetMeta.load(config.data.path)
    model = build_model(config.model, config.embedding, meta, device=meta_dev)
    return Artifact(ckpt, "checkpoint", config, meta, model, read_checkpoint_info(ckpt), pin=held)


def load_factored(checkpoint: Path | str) -> tuple[CTRModel, ExperimentConfig, DatasetMeta, Path]:
    """A training checkpoint as an unsharded factored model in this process (DCP reshards)."""
    art = load_artifact(checkpoint)
    if art.kind != "checkpoint":
        raise ValueError(f"{checkpoint}: a collapse output, not a training checkpoint")
    return art.materialize(), art.config, art.meta, art.path


def load_collapsed(directory: Path | str) -> tuple[CTRModel, ExperimentConfig, DatasetMeta]:
    """A collapse output as a plain d-dim model (stock TorchRec EBC) in this process."""
    directory = Path(directory)
    read_manifest(directory)  # a clear error when it is not a collapse output
    art = load_artifact(directory)
    return art.materialize(), art.config, art.meta


# --------------------------------------------------------------------------------------------
# where the MLET tables sit in a factored model


def mlet_module(model: nn.Module) -> tuple[str, MLETEmbeddingBagCollection]:
    """(path, module) of the one MLET module of a factored model."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, MLETEmbeddingBagCollection)]
    if len(found) != 1:
        raise ValueError(f"expected one MLETEmbeddingBagCollection in the model, found {len(found)}")
    return found[0]


def extra_tables(factored: nn.Module, plain: nn.Module) -> list[tuple[Any, str, str]]:
    """(config, the collapsed model's EBC path, training-model key) of each extra table of the MLET module (the
    ``lin_*`` tables ride along in W1 while training; the collapsed model keeps them in another plain EBC)."""
    from torchrec import EmbeddingBagCollection

    mlet_path, mlet = mlet_module(factored)
    where = {
        t.name: path
        for path, m in plain.named_modules()
        if type(m) is EmbeddingBagCollection
        for t in m.embedding_bag_configs()
    }
    out = []
    for t in mlet.extra_bag_configs():
        if t.name not in where:
            raise ValueError(f"the collapsed model has no table {t.name} (an extra table of the MLET module)")
        out.append((t, where[t.name], f"{mlet_path}.w1.embedding_bags.{t.name}.weight"))
    return out


def shard_for_job(art: Artifact, rank_device: torch.device, world_size: int) -> nn.Module:
    """Collective: ``art``'s model sharded over the job with the run's sharding constraints, weights loaded."""
    from data_pipes.schema import table_name
    from mlet_torchrec.training.distributed import sharding_constraints

    features = art.meta.sparse_names()
    constraints = sharding_constraints(
        art.config.embedding, features, {f: table_name(f) for f in features}, world_size, rank_device.type
    )
    return art.shard(constraints, rank_device)
