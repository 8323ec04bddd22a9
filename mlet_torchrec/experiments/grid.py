"""The grid of a sweep: axes parsed from the command line, expanded into cells keyed by their resolved config.

Example:
    >>> parse_grid("d=[4,8] k=[none,64] seed=[0]")
    {'embedding.d': [4, 8], 'embedding.k': [None, 64], 'train.seed': [0]}
    >>> len(expand_grid(parse_grid("d=[4,8] k=[none,64]")))
    4
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlet_torchrec.config import ConfigError, ExperimentConfig, load_config

ALIASES = {"seed": "train.seed", "d": "embedding.d", "k": "embedding.k", "lr": "sparse_optimizer.lr"}
# Keys that do not change what a run computes: left out of the cell key.
_KEY_EXCLUDE = {("run",), ("train", "progress"), ("train", "log_every"), ("data", "num_workers")}


def _yaml_value(raw: str) -> Any:
    if raw.strip().lower() in ("none", "~"):
        return None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"grid value {raw!r} is not valid YAML: {e}") from e


def parse_grid(text: str) -> dict[str, list[Any]]:
    """``"embedding.d=[4,8] embedding.k=[none,64] seed=[0,1]"`` -> ordered {key: values}.

    Axes are separated by whitespace outside brackets; a value without brackets is a one-value axis;
    list items may be ``none``/``null``. ``seed``, ``d``, ``k``, ``lr`` are short for ``train.seed``,
    ``embedding.d``, ``embedding.k``, ``sparse_optimizer.lr``.
    """
    grid: dict[str, list[Any]] = {}
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


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the axes, the last axis varying fastest."""
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]


def _strip(d: dict[str, Any], path: tuple[str, ...] = ()) -> dict[str, Any]:
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
    overrides: dict[str, Any]
    """The grid (and tuning) values of this run, dotted keys."""
    role: str
    """'grid' (a cell of the grid) or 'tune' (an extra run of the tuning grid)."""
    config: ExperimentConfig
    key: str = ""
    tags: dict[str, Any] = field(default_factory=dict)

    def label(self) -> str:
        return " ".join(format_override(k, v) for k, v in self.overrides.items())


def plan_cells(
    config_path: str | None,
    grid: dict[str, list[Any]],
    tune: dict[str, list[Any]],
    base_overrides: Sequence[str] = (),
    runs_dir: str = "runs/sweep",
    tune_mlet: bool = False,
) -> list[Cell]:
    """The cells of a sweep, de-duplicated by key (a tuning value equal to the base value is one run).

    The tuning axes are run for the baseline (k=null) cells, and for every cell when ``tune_mlet``."""
    cells: list[Cell] = []
    seen: set[str] = set()

    def add(ov: dict[str, Any], role: str) -> None:
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


def budget_note(grid: dict[str, list[Any]], tune: dict[str, list[Any]], tune_mlet: bool = False) -> str:
    ks = [k for k in grid.get("embedding.k", [None]) if k is not None]
    n_tune = len(expand_grid(tune)) if tune else 1
    axes = ", ".join(tune) or "nothing"
    if tune_mlet:
        return (
            f"per (d, seed): every method (the baseline and MLET at each k in {ks}) gets the same {n_tune} "
            f"tuning run(s) (one per value of {axes}) plus its run at the config's values"
        )
    return (
        f"per (d, seed): MLET {len(ks)} run(s) (one per k in {ks}); tuned baseline {n_tune} run(s) "
        f"(one per value of {axes})"
    )
