"""The one typed schema of a run: YAML files plus dotted ``key.sub=value`` overrides.

Every run writes its resolved config to ``RUN_DIR/config.yaml``; that file alone reproduces the run.
A config is named by a path or, when no such file exists, by the name of one shipped with the package
(``tiny``, ``demo``, ``models/deepfm``...: the YAML files of the repository's configs/ folder).

Example:
    >>> cfg = load_config(None, ["embedding.d=8", "embedding.k=64"])
    >>> cfg.embedding.k, cfg.embedding.d
    (64, 8)
    >>> load_config("tiny").train.batch_size   # the packaged configs/tiny.yaml
    64
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from mlet_torchrec.errors import UserError
from mlet_torchrec.models.configs import DEFAULT_MODEL, MODEL_CONFIGS, ModelConfig, default_model_config
from mlet_torchrec.models.configs.base import Strict as _Strict

ShardingType = Literal["auto", "table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel"]
SparseOptimizerName = Literal["sgd", "adagrad", "rowwise_adagrad"]
DenseOptimizerName = Literal["sgd", "adagrad", "adam"]


class ConfigError(UserError, ValueError):
    """A config file or override that does not fit the schema; the message (one line) names the key."""


class DataConfig(_Strict):
    path: str = Field("data/synthetic", min_length=1)
    """A data set directory (see data_pipes/schema.py)."""
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes per rank (0: read in the training process); same batches for any count."""
    validate_ids: bool = True
    """Check ids, labels and dense values of every batch before they reach the kernels."""
    shuffle: bool = True
    """Shuffle each epoch by (seed, epoch), the same at every world size (data_pipes/order.py)."""


class TableConfig(_Strict):
    """Per-table settings that override the embedding-wide ones."""

    k: int | None = Field(None, gt=0)
    sharding: ShardingType | None = None


class EmbeddingConfig(_Strict):
    d: int = Field(16, gt=0)
    """Embedding dimension served after collapse."""
    k: int | None = Field(None, gt=0)
    """MLET inner dimension for every table; null trains single-layer d-dim tables (the baseline)."""
    sigma: float = Field(0.25, gt=0)
    """Std of the N(0, sigma^2) init of W2 (papers: 0.25 for DLRM, 0.5 for the DeepCTR models)."""
    allow_k_below_d: bool = False
    init: Literal["uniform", "normal"] = "uniform"
    """Initialisation of every table (W1 for MLET): 'uniform' draws U(-1/sqrt(n), 1/sqrt(n)) like TorchRec
    and DLRM; 'normal' draws N(0, init_std^2) like DeepCTR-Torch (its models' default)."""
    init_std: float = Field(1e-4, gt=0)
    pooling: Literal["sum", "mean"] = "sum"
    sharding: ShardingType = "auto"
    """Sharding type for all tables; 'auto' lets the TorchRec planner choose."""
    w1_dtype: Literal["fp32", "fp16"] = "fp32"
    """Storage of the W1 tables (and of single-layer tables): fp16 halves their memory; the fused optimizer
    updates them with stochastic rounding, W2 stays fp32 and collapse still emits fp32 W = W1 @ W2."""
    uvm_caching: bool = False
    """CUDA only: let the planner keep tables that do not fit in GPU memory in host memory (UVM) behind a GPU
    cache (FBGEMM's fused_uvm_caching kernel); false keeps every table in GPU memory. A CPU run refuses it."""
    uvm_cache_load_factor: float = Field(0.2, gt=0, le=1)
    """With uvm_caching: the share of a cached table's rows held in the GPU cache."""
    tables: dict[str, TableConfig] = Field(default_factory=dict)
    """Per-feature overrides, keyed by sparse feature name."""

    @model_validator(mode="after")
    def _k_not_below_d(self) -> EmbeddingConfig:
        ks = {"embedding.k": self.k} | {f"embedding.tables.{n}.k": t.k for n, t in self.tables.items()}
        for key, k in ks.items():
            if k is not None and k < self.d and not self.allow_k_below_d:
                raise ValueError(
                    f"{key}={k} is below embedding.d={self.d}: MLET needs k >= d "
                    "(set embedding.allow_k_below_d=true to train a low-rank factorisation anyway)"
                )
        return self

    def k_for(self, feature: str) -> int | None:
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


class TrainConfig(_Strict):
    batch_size: int = Field(128, gt=0)
    """Global batch size, split evenly over the ranks."""
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)
    """Stop after this many steps (all epochs together); null runs every epoch to the end."""
    eval_every: int = Field(0, ge=0)
    """Evaluate on the validation split every N steps (0: only at the end)."""
    eval_batch_size: int = Field(4096, gt=0)
    checkpoint_every: int = Field(0, ge=0)
    """Checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = Field(3, ge=1)
    """Keep the newest N complete checkpoints in ``run.dir/checkpoints`` (older ones are deleted)."""
    log_every: int = Field(100, gt=0)
    """Read the loss (and the NaN check) from the device every N steps: the loop never waits on it in between."""
    seed: int = 0
    progress: bool = True
    """A progress bar on rank 0's stderr, shown only when that is a terminal."""
    pipeline: Literal["auto", "sparse_dist", "base", "none"] = "auto"
    """The step driver: TorchRec's TrainPipelineSparseDist ('sparse_dist': batch i+1's input distribution
    overlaps batch i's compute; 'auto' picks it), TrainPipelineBase ('base'), or a plain loop ('none')."""
    warmup_steps: int = Field(0, ge=0)
    """Linear lr warmup of both optimizers (fused W1 and dense) over the first N steps."""
    lr_decay: Literal["none", "linear", "cosine"] = "none"
    """Decay of both learning rates after the warmup, to ``min_lr_ratio`` of their base at the last step."""
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    grad_clip_norm: float | None = Field(None, gt=0)
    """Clip the dense parameters' (MLPs, W2) global gradient norm to this; null: no clipping."""
    bf16_autocast: bool = False
    """CUDA only: run the forward under bf16 autocast (the loss stays fp32). A CPU run refuses it."""
    async_checkpoint: bool = False
    """Write periodic checkpoints in the background (DCP async_save); each becomes visible only once
    complete on every rank (committed at the next checkpoint or at the end)."""


class RunConfig(_Strict):
    dir: str = Field("runs/default", min_length=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    resume: bool = True
    """Continue from the newest complete checkpoint in ``dir`` (model, both optimizers, data position,
    RNG states), as torchrun/TorchX restarts need; false starts over and deletes ``dir``'s checkpoints."""
    plan: str | None = None
    """A sharding plan written by ``mlet plan`` (PLAN.json) to use instead of planning again; refused if it was
    made for another world size, device or config."""
    init_from: str | None = Field(None, min_length=1)
    """A warm start: a run directory (its newest checkpoint) or checkpoint whose model and optimizer state this
    run starts from when ``dir`` has no checkpoint of its own, e.g. to train on a new day's data set converted
    with ``--features-from`` that run. The step count (and so the learning-rate schedule, a function of the step)
    continues from the checkpoint's; the data set is read from its start; ``train.max_steps`` counts this run's
    steps. Refused when the model, embeddings or optimizers differ, or the data set's features or feature
    transform are not the checkpoint's."""


class ExperimentConfig(_Strict):
    data: DataConfig = Field(default_factory=DataConfig)
    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig)
    model: ModelConfig = Field(default_factory=default_model_config)
    """The model: ``name`` picks its config class (mlet_torchrec/models/configs/), which owns its other keys."""
    sparse_optimizer: SparseOptimizerConfig = Field(default_factory=SparseOptimizerConfig)
    dense_optimizer: DenseOptimizerConfig = Field(default_factory=DenseOptimizerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def save(self, path: Path | str) -> None:
        Path(path).write_text(self.to_yaml())


def format_validation_error(err: ValidationError, source: str) -> str:
    """Every problem of ``err`` on one line: ``invalid config (SOURCE): key: msg (got X); key: ...``."""
    problems = []
    for e in err.errors():
        loc, model = _model_location(e["loc"])
        key = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            of_model = f" of model {model} (its keys: {', '.join(MODEL_CONFIGS[model].model_fields)})" if model else ""
            problems.append(f"{key}: unknown key{of_model}")
        elif e["type"] == "union_tag_invalid":  # the model's name picks its config class
            names = ", ".join(map(repr, MODEL_CONFIGS))
            problems.append(f"{key}.name: Input should be one of {names} (got {_short_repr(e['input'].get('name'))})")
        elif e["type"] == "union_tag_not_found":
            problems.append(f"{key}: should be a mapping of model keys (got {_short_repr(e['input'])})")
        else:
            # pydantic's messages may span lines; a validator's ValueError comes as "Value error, MESSAGE"
            msg = " ".join(str(e["msg"]).split()).removeprefix("Value error, ")
            problems.append(f"{key}: {msg} (got {_short_repr(e['input'])})")
    return f"invalid config ({source}): " + "; ".join(problems)


def _model_location(loc: tuple[int | str, ...]) -> tuple[tuple[int | str, ...], str | None]:
    """``('model', 'deepfm', 'x')`` -> ``(('model', 'x'), 'deepfm')``: the union's tag is the model, not a key."""
    if len(loc) >= 2 and loc[0] == "model" and loc[1] in MODEL_CONFIGS:
        return (loc[0], *loc[2:]), str(loc[1])
    return loc, None


def _short_repr(value: Any) -> str:
    """A bounded repr: hostile YAML (aliases nesting lists 9 deep) must not make the message explode."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother = 2, 6, 6, 100, 100
    text = r.repr(value)
    return text if len(text) <= 160 else text[:157] + "..."


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'a.b=3'`` -> (['a', 'b'], 3); the value is read as YAML, so ``null``, lists and numbers work."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError) as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {e}") from None
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
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


def packaged_configs() -> Traversable:
    """The configs shipped with the package (the repository's configs/ folder; in a wheel, package data)."""
    return files("mlet_torchrec") / "configs"


def packaged_config_names() -> list[str]:
    """Names ``--config`` accepts without a file: ``['avazu_dcn', ..., 'models/deepfm', ..., 'tiny']``."""
    names: list[str] = []

    def walk(node: Traversable, prefix: str) -> None:
        for child in node.iterdir():
            if child.is_dir():
                walk(child, f"{prefix}{child.name}/")
            elif child.name.endswith(".yaml"):
                names.append(prefix + child.name[: -len(".yaml")])

    root = packaged_configs()
    if root.is_dir():
        walk(root, "")
    return sorted(names)


def read_config_text(name: Path | str) -> tuple[str, str]:
    """``(YAML text, source)`` of a config file, or else of the packaged config of that name.

    A file always wins, so a user's ``tiny.yaml`` in the working directory is the one read.
    """
    path = Path(name)
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        raise ConfigError(f"config file {path} cannot be read: it is a directory, not a YAML file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read as UTF-8 text: {e}") from None
    stem = str(name).removesuffix(".yaml")
    if stem and not path.is_absolute() and ".." not in path.parts:
        packaged = packaged_configs().joinpath(*(stem + ".yaml").split("/"))
        if packaged.is_file():
            return packaged.read_text(encoding="utf-8"), f"packaged config {stem}"
    known = ", ".join(n for n in packaged_config_names() if "/" not in n)
    raise ConfigError(f"config file {path} does not exist and is not a packaged config name ({known})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden by the keys beside it
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str | int | float | bool):
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def read_config_mapping(name: Path | str) -> tuple[dict[str, Any], str]:
    """``(mapping, source)`` of a YAML config named by a path or a packaged name (see :func:`read_config_text`).

    Any YAML file of settings goes through here (run configs, ``mlet synth --config``), so every one of them
    fails the same way: one line naming the file.
    """
    text, source = read_config_text(name)
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        detail = " ".join(str(e).split())
        raise ConfigError(f"config file {name} is not valid YAML: {detail}") from None
    except RecursionError:
        raise ConfigError(f"config file {name} is not a usable config: nested too deeply") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {name}: top level must be a mapping, got {type(raw).__name__}")
    return raw, source


def _switch_model(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``raw`` with its model section cut to the keys of the model the last ``model.name=`` override names."""
    names = [value for path, value in map(parse_override, overrides) if path == ["model", "name"]]
    section = raw.get("model")
    if not names or not isinstance(names[-1], str) or names[-1] not in MODEL_CONFIGS or not isinstance(section, dict):
        return raw
    if section.get("name", DEFAULT_MODEL) == names[-1]:
        return raw
    keys = MODEL_CONFIGS[names[-1]].model_fields
    return {**raw, "model": {k: v for k, v in section.items() if k in keys}}


def load_config(path: Path | str | None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML config (a file, a packaged config's name, or the defaults when ``path`` is None) and apply
    dotted overrides.

    An override of ``model.name`` that switches the file's model keeps the file's model keys the new model has
    (``dnn_hidden_units`` between DeepCTR models) and drops the rest, so a sweep's ``model.name=[deepfm,dcn]``
    works over any base config; a key of another model given in the file's own section or in an override is an
    error.
    """
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        raw, source = read_config_mapping(path)
    raw = apply_overrides(_switch_model(raw, overrides), overrides)
    if overrides:
        source += " with overrides " + " ".join(overrides)
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None
