"""The report's PNG plots: metrics against d per method, PR-AUC by id frequency, singular values.

Every plot is rendered into memory and written atomically (``mlet_torchrec.io``), so a report directory
never holds half a PNG.

Example:
    >>> name = plot_vs_d(res, "", "test.auc", "test AUC", out / "plots" / "auc.png", "synth")   # doctest: +SKIP
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from mlet_torchrec.experiments.selection import Results
from mlet_torchrec.experiments.stats import mean_std
from mlet_torchrec.io import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _plt() -> ModuleType:
    """``matplotlib.pyplot`` on the Agg backend, imported on first use (the package does not need it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 8, "figure.dpi": 80})
    return plt


def _save(fig: Figure, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


# matplotlib line keyword arguments per method kind
_STYLES: dict[str, dict[str, Any]] = {
    "paper": dict(ls="--", marker="s", color="k"),
    "tuned": dict(ls="-", marker="s", color="k"),
}


def _series_vs_d(ax: Axes, res: Results, variant: str, path: str) -> None:
    """One line per method (mean ± std over seeds of ``path``) against d on a log2 axis."""
    for m in res.picks():
        if m.kind == "mlet_best":
            continue
        xs: list[int] = []
        ys: list[float] = []
        es: list[float] = []
        for d in res.ds:
            mm, ss, n = mean_std(res.values(m, variant, d, path))
            if n:
                xs.append(d)
                ys.append(mm)
                es.append(0 if math.isnan(ss) else ss)
        ax.errorbar(xs, ys, yerr=es, capsize=2, label=m.name, lw=1, ms=3, **_STYLES.get(m.kind, {"marker": "o"}))
    ax.set_xscale("log", base=2)
    ax.set_xticks(res.ds)
    ax.set_xticklabels([str(d) for d in res.ds])


def plot_vs_d(res: Results, variant: str, path: str, ylabel: str, out: Path, title: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    _series_vs_d(ax, res, variant, path)
    ax.set_xlabel("embedding dim d (served)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    return _save(fig, out)


def plot_freq(res: Results, variant: str, out: Path, title: str) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(6.0, 2.6), sharey=False)
    for ax, split, lab in ((axes[0], "top10", "10% most frequent"), (axes[1], "bottom10", "10% least frequent")):
        _series_vs_d(ax, res, variant, f"freq.{split}.pr_auc")
        ax.set_xlabel("d")
        ax.set_title(f"test PR-AUC, {lab}", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.suptitle(title, fontsize=8, y=1.03)
    return _save(fig, out)


def plot_spectrum(res: Results, variant: str, out: Path, title: str) -> str | None:
    d = max(res.ds)
    seed = res.seeds[0]
    runs = res.cells.get((variant, d, seed), [])
    if not runs or "spectrum" not in runs[0]:
        return None
    table = max(runs[0]["spectrum"], key=lambda t: runs[0]["spectrum"][t]["rows"])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    for m in res.picks():
        if m.kind == "mlet_best" or (res.mlet_tuned and m.kind in ("paper", "mlet")):
            continue
        r = res.pick(m, variant, d, seed)
        if r is None:
            continue
        s = r["spectrum"][table]["singular_values"]
        ax.semilogy(
            range(1, len(s) + 1),
            [x / s[0] for x in s],
            marker="o",
            ms=3,
            lw=1,
            label=m.name,
            **({"color": "k", "ls": "--"} if m.kind == "paper" else {}),
        )
    ax.axhline(0.01, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("index")
    ax.set_ylabel("σ_i / σ_1")
    ax.set_title(
        f"{title}: singular values of collapsed {table} ({runs[0]['spectrum'][table]['rows']} rows), "
        f"d={d}, seed {seed}",
        fontsize=7,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    return _save(fig, out)
