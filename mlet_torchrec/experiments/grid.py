"""The grid of a sweep: axes parsed from the command line, expanded into cells keyed by their resolved config.

Example:
    >>> parse_grid("d=[4,8] k=[none,64] seed=[0]")
    {'embedding.d': [4, 8], 'embedding.k': [None, 64], 'train.seed': [0]}
    >>> len(expand_grid(parse_grid("d=[4,8] k=[none,64]")))
    4
    >>> resolve_overrides({"embedding.d": 8, K_PER_D: 4, "embedding.sigma": 0.5}, None)
    {'embedding.d': 8, 'embedding.sigma': 0.5, 'embedding.k': 32}
    >>> resolve_overrides({"embedding.d": 8, K_PER_D: None, "embedding.sigma": 0.5}, None)
    {'embedding.d': 8, 'embedding.k': None}
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

K_PER_D = "embedding.k_per_d"
"""A grid axis, not a config key: the inner dimension as a multiple of d (``kd=[none,1,4,16]`` gives k = d, 4d,
16d for every d; 0.5 gives d/2 and sets ``embedding.allow_k_below_d`` for that cell)."""
# Keys that only matter for MLET: a single-layer (k = null) cell drops them, so a sigma axis adds no baseline runs.
_MLET_ONLY = ("embedding.sigma", "embedding.allow_k_below_d")
ALIASES = {
    "seed": "train.seed",
    "d": "embedding.d",
    "k": "embedding.k",
    "kd": K_PER_D,
    "lr": "sparse_optimizer.lr",
    "dense_lr": "dense_optimizer.lr",
}
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


def resolve_overrides(
    ov: dict[str, Any], config_path: str | None, base_overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """A cell's overrides as config keys: ``kd`` becomes ``embedding.k`` (d times it), and a single-layer cell
    drops the MLET-only keys (sigma), so the baseline of every sigma is one run."""
    out = dict(ov)
    if K_PER_D in out:
        kd = out.pop(K_PER_D)
        d = out.get("embedding.d")
        if d is None:
            d = load_config(config_path, list(base_overrides)).embedding.d
        k: int | None = None
        if kd is not None:
            k = int(round(d * kd))
            if k < 1 or abs(k - d * kd) > 1e-9:
                raise ConfigError(f"grid: kd={kd} with d={d} gives no whole inner dimension k")
            if kd < 1:  # asking for k below d is the explicit request the config check wants
                out["embedding.allow_k_below_d"] = True
        out["embedding.k"] = k
    k_final = out["embedding.k"] if "embedding.k" in out else _base_k(config_path, base_overrides)
    if k_final is None:
        for key in _MLET_ONLY:
            out.pop(key, None)
    return out


def _base_k(config_path: str | None, base_overrides: Sequence[str]) -> int | None:
    return load_config(config_path, list(base_overrides)).embedding.k


def _config_value(rec: dict[str, Any], dotted: str) -> Any:
    node: Any = rec.get("config") or {}
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def tuning_identity(config: dict[str, Any], tune_keys: Sequence[str]) -> str:
    """What a run computes apart from its seed and tuning values: its resolved config (as :func:`cell_key`
    sees it) with those keys blanked. Runs made by different sweeps (other grids, same config) share it."""
    canon = _strip(json.loads(json.dumps(config)))
    for dotted in ("train.seed", *tune_keys):
        node: Any = canon
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node[last] = None
    return json.dumps(canon, sort_keys=True, separators=(",", ":"))


def best_tuning(
    records: Sequence[dict[str, Any]], tune_keys: Sequence[str], tune_seeds: Sequence[int]
) -> dict[str, dict[str, Any]]:
    """Per cell (:func:`tuning_identity`): the tuning values of its best run on **validation** AUC among the
    tuning seeds' finished runs (diverged runs never win)."""
    best: dict[str, tuple[float, dict[str, Any]]] = {}
    for r in records:
        auc = (r.get("valid") or {}).get("auc")
        if r.get("status") != "ok" or r.get("seed") not in tune_seeds or auc is None or "config" not in r:
            continue
        key = tuning_identity(r["config"], tune_keys)
        if key not in best or auc > best[key][0]:
            best[key] = (float(auc), {k: _config_value(r, k) for k in tune_keys})
    return {k: v for k, (_, v) in best.items()}


def _edge_steps(tune: dict[str, list[Any]], extend: int) -> dict[str, tuple[float, float, float, float]]:
    """Per numeric tuning axis of >= 2 positive values: (lowest, highest, step down, step up), the steps being the
    grid's own end ratios and the bounds ``extend`` steps past each end."""
    out = {}
    for key, values in tune.items():
        vals = sorted(float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool) and v > 0)
        if len(vals) >= 2 and extend > 0:
            down, up = vals[1] / vals[0], vals[-1] / vals[-2]
            out[key] = (vals[0] / down**extend, vals[-1] * up**extend, down, up)
    return out


def extensions(
    identity: str, tune: dict[str, list[Any]], extend: int, records: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The tuning values that extend a cell's grid: for each numeric tuning axis whose best value on validation
    AUC (over the store's runs of this cell, :func:`tuning_identity`) is the lowest (highest) value tried, one step
    further (the grid's end ratio), with every value of the other axes, while within ``extend`` steps of the
    grid's end. A highest value with a diverged run above it is a real edge: no step up.

    >>> recs = [{"status": "ok", "config": {"sparse_optimizer": {"lr": lr}}, "valid": {"auc": a}}
    ...         for lr, a in ((0.01, 0.8), (0.04, 0.7))]
    >>> extensions(tuning_identity(recs[0]["config"], ["sparse_optimizer.lr"]),
    ...            {"sparse_optimizer.lr": [0.01, 0.04]}, 2, recs)
    [{'sparse_optimizer.lr': 0.0025}]
    """
    keys = list(tune)
    mine = [r for r in records if "config" in r and tuning_identity(r["config"], keys) == identity]
    ok = [r for r in mine if r.get("status") == "ok" and (r.get("valid") or {}).get("auc") is not None]
    if not ok:
        return []
    best = max(ok, key=lambda r: float(r["valid"]["auc"]))
    out: list[dict[str, Any]] = []
    for key, (low, high, down, up) in _edge_steps(tune, extend).items():
        tried = sorted({float(_config_value(r, key)) for r in mine if r.get("status") in ("ok", "diverged")})
        ok_tried = sorted({float(_config_value(r, key)) for r in ok})
        chosen = float(_config_value(best, key))
        others = expand_grid({k: v for k, v in tune.items() if k != key})
        if chosen == tried[0] and chosen / down >= low * (1 - 1e-9):
            out += [{**o, key: chosen / down} for o in others]
        if chosen == tried[-1] == ok_tried[-1] and chosen * up <= high * (1 + 1e-9):
            out += [{**o, key: chosen * up} for o in others]
    return out


def plan_cells(
    config_path: str | None,
    grid: dict[str, list[Any]],
    tune: dict[str, list[Any]],
    base_overrides: Sequence[str] = (),
    runs_dir: str = "runs/sweep",
    tune_mlet: bool = False,
    tune_seeds: Sequence[int] | None = None,
    records: Sequence[dict[str, Any]] = (),
    extend: int = 0,
) -> tuple[list[Cell], int]:
    """The cells of a sweep, de-duplicated by key (a tuning value equal to the base value is one run), and how
    many wait for their tuning runs.

    The tuning axes are run for the baseline (k=null) cells, and for every cell when ``tune_mlet``. With
    ``tune_seeds`` they are run for those seeds only; every other seed runs once, at the values its cell's tuning
    seeds chose on validation AUC (from ``records``, the store), role ``selected``; a cell whose tuning runs are
    not in the store yet is pending (counted, not planned). With ``extend`` a tuned cell whose best value (in the
    store) sits at an end of a numeric tuning axis also gets the next value past it (:func:`extensions`, up to
    ``extend`` steps), so a sweep run until nothing is left to plan ends with every choice inside its grid or
    at the bound."""
    cells: list[Cell] = []
    seen: set[str] = set()
    pending = 0
    chosen = best_tuning(records, list(tune), tune_seeds) if tune_seeds is not None else {}

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

    for raw in expand_grid(grid):  # a baseline cell's tuning runs follow it, so a cut-short sweep stays usable
        ov = resolve_overrides(raw, config_path, base_overrides)
        k = ov["embedding.k"] if "embedding.k" in ov else _base_k(config_path, base_overrides)
        tuned = bool(tune) and (k is None or tune_mlet)
        seed = ov.get("train.seed")
        if tuned and tune_seeds is not None and seed not in tune_seeds:
            config = load_config(config_path, list(base_overrides) + [format_override(k, v) for k, v in ov.items()])
            values = chosen.get(tuning_identity(config.model_dump(mode="json"), list(tune)))
            if values is None:
                pending += 1
            else:
                add({**ov, **values}, "selected")
            continue
        add(ov, "grid")
        if tuned:
            for tv in expand_grid(tune):
                add({**ov, **tv}, "tune")
            if extend and (tune_seeds is None or seed in tune_seeds):
                config = load_config(config_path, list(base_overrides) + [format_override(k, v) for k, v in ov.items()])
                identity = tuning_identity(config.model_dump(mode="json"), list(tune))
                for tv in extensions(identity, tune, extend, [r for r in records if r.get("seed") == seed]):
                    add({**ov, **tv}, "tune")
    return cells, pending


def budget_note(
    grid: dict[str, list[Any]],
    tune: dict[str, list[Any]],
    tune_mlet: bool = False,
    tune_seeds: Sequence[int] | None = None,
) -> str:
    ks = [k for k in grid.get("embedding.k", [None]) if k is not None]
    if K_PER_D in grid:
        ks = [f"{kd:g}d" for kd in grid[K_PER_D] if kd is not None]
    n_tune = len(expand_grid(tune)) if tune else 1
    axes, k_list = ", ".join(tune), ", ".join(map(str, ks))
    if not tune:
        return f"per (d, seed): MLET {len(ks)} run(s) (one per k: {k_list}); baseline 1 run, not tuned (no --tune axes)"
    if tune_mlet:
        where = f" on seed(s) {list(tune_seeds)}; the other seeds run once at the chosen values" if tune_seeds else ""
        return (
            f"per (d, seed): every method (the baseline and MLET at each k: {k_list}) gets the same {n_tune} "
            f"tuning run(s) (one per value of {axes}) plus its run at the config's values{where}"
        )
    return (
        f"per (d, seed): MLET {len(ks)} run(s) (one per k: {k_list}); tuned baseline {n_tune} run(s) "
        f"(one per value of {axes})"
    )
