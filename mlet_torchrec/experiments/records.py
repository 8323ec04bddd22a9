"""The one record model of the research layer: a store line (one run) and the method it trained.

A store line is the dict ``mlet sweep`` appends (:mod:`.store`): its resolved config, learning rates, role,
seed and metrics. Its **method** (:class:`MethodKey`) is what it trained minus its learning rates and seed:
(model, epochs, d, k, sigma), sigma 0 for the single-layer baseline (k 0). Its **replicate** is its seed, or for
the re-split stores its split (:func:`as_splits`). Which run stands for a method (selection on validation AUC)
is :mod:`.family_data`'s; the older single-sweep report picks rows by :class:`.selection.Pick`.

Example:
    >>> method_of({"d": 8, "k": 32, "config": {"model": {"name": "dcn"}, "embedding": {"sigma": 0.5}}})
    MethodKey(model='dcn', epochs=1, d=8, k=32, sigma=0.5)
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, order=True)
class MethodKey:
    model: str
    epochs: int
    d: int
    k: int  # 0 for the single-layer baseline (sortable)
    sigma: float  # 0.0 for the baseline

    @property
    def is_mlet(self) -> bool:
        return self.k > 0

    @property
    def kd(self) -> float:
        """k as a multiple of d (0 for the baseline)."""
        return self.k / self.d

    def baseline(self) -> MethodKey:
        """The single-layer method this one is compared with (same model, epochs and d)."""
        return MethodKey(self.model, self.epochs, self.d, 0, 0.0)

    def label(self) -> str:
        if not self.is_mlet:
            return "baseline"
        kd = f"{self.kd:g}d"
        return f"MLET k={self.k} ({kd}, σ={self.sigma:g})"


def method_of(rec: dict[str, Any]) -> MethodKey:
    cfg = rec.get("config") or {}
    k = rec.get("k")
    sigma = (cfg.get("embedding") or {}).get("sigma", 0.0) if k is not None else 0.0
    return MethodKey(
        model=str((cfg.get("model") or {}).get("name", "?")),
        epochs=int((cfg.get("train") or {}).get("epochs", 1)),
        d=int(rec["d"]),
        k=int(k or 0),
        sigma=float(sigma),
    )


_SPLIT = re.compile(r"split(\d+)$")


def as_splits(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of a re-split store with each run's split index as its replicate (``seed``): the data set
    ``.../exp_criteo_split3`` is split 3. Every split then pairs MLET with its baseline and chooses both methods'
    learning rates on its own validation rows, as each seed does in the other families. Runs on a data set that
    is not a numbered split are left out.

    >>> [r["seed"] for r in as_splits([{"seed": 0, "config": {"data": {"path": "data/exp_ml_split7"}}}])]
    [7]
    """
    out = []
    for r in records:
        m = _SPLIT.search(str(((r.get("config") or {}).get("data") or {}).get("path", "")))
        if m:
            out.append({**r, "seed": int(m.group(1))})
    return out


def finished(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs with metrics, one per key (a cell two sweeps both ran counts once: the first line)."""
    seen: set[str] = set()
    out = []
    for r in records:
        auc = (r.get("valid") or {}).get("auc")
        if r.get("status") != "ok" or auc is None or math.isnan(float(auc)) or r["key"] in seen:
            continue
        seen.add(r["key"])
        out.append(r)
    return out


def by_method(records: list[dict[str, Any]]) -> dict[tuple[MethodKey, int], list[dict[str, Any]]]:
    """Every finished run per (method, seed)."""
    out: dict[tuple[MethodKey, int], list[dict[str, Any]]] = defaultdict(list)
    for r in finished(records):
        out[(method_of(r), int(r["seed"]))].append(r)
    return dict(out)
