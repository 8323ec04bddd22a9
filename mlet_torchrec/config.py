"""The one typed schema of a run: YAML files plus dotted ``key.sub=value`` overrides.

Every run writes its resolved config to ``RUN_DIR/config.yaml``; that file alone reproduces the run.

Example:
    >>> cfg = load_config(None, ["embedding.d=8", "embedding.k=64"])
    >>> cfg.embedding.k, cfg.embedding.d
    (64, 8)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ShardingType = Literal["auto", "table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel"]
SparseOptimizerName = Literal["sgd", "adagrad", "rowwise_adagrad"]
DenseOptimizerName = Literal["sgd", "adagrad", "adam"]


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    path: str = "data/synthetic"
    """A data set directory (see data_pipes/schema.py)."""
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes per rank (0: read in the training process)."""
    validate_ids: bool = True
    """Check ids, labels and dense values of every batch before they reach the kernels."""
    shuffle: bool = True
    """Shuffle the order of row groups each epoch (rows inside a row group keep their order)."""


class TableConfig(_Strict):
    """Per-table settings that override the embedding-wide ones."""

    k: Optional[int] = Field(None, gt=0)
    sharding: Optional[ShardingType] = None


class EmbeddingConfig(_Strict):
    d: int = Field(16, gt=0)
    """Embedding dimension served after collapse."""
    k: Optional[int] = Field(None, gt=0)
    """MLET inner dimension for every table; null trains single-layer d-dim tables (the baseline)."""
    sigma: float = Field(0.25, gt=0)
    """Std of the N(0, sigma^2) init of W2 (papers: 0.25 for DLRM, 0.5 for the DeepCTR models)."""
    allow_k_below_d: bool = False
    pooling: Literal["sum", "mean"] = "sum"
    sharding: ShardingType = "auto"
    """Sharding type for all tables; 'auto' lets the TorchRec planner choose."""
    tables: Dict[str, TableConfig] = Field(default_factory=dict)
    """Per-feature overrides, keyed by sparse feature name."""

    @model_validator(mode="after")
    def _k_not_below_d(self) -> "EmbeddingConfig":
        ks = {"embedding.k": self.k} | {f"embedding.tables.{n}.k": t.k for n, t in self.tables.items()}
        for key, k in ks.items():
            if k is not None and k < self.d and not self.allow_k_below_d:
                raise ValueError(
                    f"{key}={k} is below embedding.d={self.d}: MLET needs k >= d "
                    "(set embedding.allow_k_below_d=true to train a low-rank factorisation anyway)"
                )
        return self

    def k_for(self, feature: str) -> Optional[int]:
        table = self.tables.get(feature)
        return table.k if table is not None and table.k is not None else self.k

    def sharding_for(self, feature: str) -> ShardingType:
        table = self.tables.get(feature)
        return table.sharding if table is not None and table.sharding is not None else self.sharding


class OptimizerConfig(_Strict):
    name: str = "sgd"
    lr: float = Field(0.2, gt=0)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)


class SparseOptimizerConfig(OptimizerConfig):
    """Fused into the embedding kernels' backward (FBGEMM TBE); applies to W1."""

    name: SparseOptimizerName = "sgd"


class DenseOptimizerConfig(OptimizerConfig):
    """A torch.optim optimizer for the MLPs and W2."""

    name: DenseOptimizerName = "sgd"


class ModelConfig(_Strict):
    name: Literal["dlrm"] = "dlrm"
    bottom_mlp: List[int] = Field(default_factory=lambda: [512, 256, 128])
    """Hidden sizes of the dense-feature MLP; a final layer of size embedding.d is appended."""
    top_mlp: List[int] = Field(default_factory=lambda: [512, 256])
    """Hidden sizes of the over-arch MLP; a final layer of size 1 is appended."""


class TrainConfig(_Strict):
    batch_size: int = Field(128, gt=0)
    """Global batch size, split evenly over the ranks."""
    epochs: int = Field(1, gt=0)
    max_steps: Optional[int] = Field(None, gt=0)
    """Stop after this many steps (all epochs together); null runs every epoch to the end."""
    eval_every: int = Field(0, ge=0)
    """Evaluate on the validation split every N steps (0: only at the end)."""
    eval_batch_size: int = Field(4096, gt=0)
    checkpoint_every: int = Field(0, ge=0)
    """Checkpoint every N steps (0: only at the end)."""
    log_every: int = Field(100, gt=0)
    seed: int = 0
    progress: bool = True


class RunConfig(_Strict):
    dir: str = "runs/default"
    device: Literal["auto", "cpu", "cuda"] = "auto"


class ExperimentConfig(_Strict):
    data: DataConfig = Field(default_factory=DataConfig)
    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    sparse_optimizer: SparseOptimizerConfig = Field(default_factory=SparseOptimizerConfig)
    dense_optimizer: DenseOptimizerConfig = Field(default_factory=DenseOptimizerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def save(self, path: Path | str) -> None:
        Path(path).write_text(self.to_yaml())


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {key}: {msg}" + (f" (got {e['input']!r})" if e["type"] != "extra_forbidden" else ""))
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'a.b=3'`` -> (['a', 'b'], 3); the value is read as YAML, so ``null``, lists and numbers work."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {e}") from e
    return key.strip().split("."), value


def apply_overrides(raw: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for depth, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                section = ".".join(path[: depth + 1])
                raise ConfigError(f"override {text!r}: {section} is a value, not a section")
            node = child
        node[path[-1]] = value
    return raw


def load_config(path: Optional[Path | str], overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML config (or the defaults when ``path`` is None) and apply dotted overrides."""
    raw: Dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides)
    if overrides:
        source += " with overrides " + " ".join(overrides)
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None
