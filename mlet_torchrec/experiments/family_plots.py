"""The figures of the experiment families (a)-(e): one PNG per family, one subplot per data set.

Each function takes ``recs_by_ds`` (data set name -> every record of that data set's store for the family's
setup), keeps the family's methods (``FAMILIES``) and writes ``out``; with no run to show it writes nothing and
returns None. Points are the mean test AUC of the tuned runs (:func:`.family_data.tuned`) with the 95% t
interval over seeds as error bar (none for a single seed). Family (e) is different: it reads the seed-0 tuning
grid of the DLRM/SGD store and plots validation AUC against the *effective* embedding learning rate, which is
the learning rate for the baseline and k·σ²·η for MLET (the papers' Theorem 1: W2ᵀW2 ≈ kσ²·I rescales the step).

Colours are fixed per method kind (baseline black; MLET by k/d, by σ in (e), by d in (c)) so figures compare.

Example:
    >>> round(interp_log_lr([0.1, 1.0, 10.0], [0.60, 0.70, 0.65], 10**0.5), 6)
    0.675
    >>> interp_log_lr([0.1, 1.0], [0.60, 0.70], 20.0) is None
    True
    >>> plot_models({"movielens": load_results(store)}, out / "models.png")   # doctest: +SKIP
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlet_torchrec.experiments.family_data import FAMILIES, Family, auc_by_seed, tuned
from mlet_torchrec.experiments.family_tables import interp_log
from mlet_torchrec.experiments.plots import _plt, _save
from mlet_torchrec.experiments.records import MethodKey, by_method
from mlet_torchrec.experiments.stats import t_interval

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Records = dict[str, list[dict[str, Any]]]
Runs = dict[tuple[MethodKey, int], dict[str, Any]]

_DS_ORDER = ("movielens", "criteo_sample", "synth1m")
_KD_COLOR = {0.0: "black", 0.5: "tab:purple", 1.0: "tab:blue", 4.0: "tab:orange", 16.0: "tab:green"}
_SIGMA_COLOR = {0.01: "tab:blue", 0.05: "tab:orange", 0.25: "tab:green", 0.5: "tab:red", 1.0: "tab:purple"}
_D_COLOR = {4: "tab:brown", 8: "tab:blue", 16: "tab:orange", 32: "tab:green", 64: "tab:red"}
_TEST_AUC = "test AUC (mean, 95% t interval)"
_EPOCH_STYLE = {1: dict(ls="-", marker="o"), 3: dict(ls="--", marker="s")}


def interp_log_lr(xs: Sequence[float], ys: Sequence[float], x: float) -> float | None:
    """``ys`` at ``x``, linear in log(lr) between the two neighbouring points; None outside ``xs``' range
    (:func:`.family_tables.interp_log`, the report's interpolation, so figure and tables agree).

    >>> interp_log_lr([1.0, 4.0], [0.5, 0.7], 2.0), interp_log_lr([1.0, 4.0], [0.5, 0.7], 4.0)
    (0.6, 0.7)
    >>> interp_log_lr([], [], 1.0), interp_log_lr([1.0, 2.0], [0.5, 0.6], 0.0)
    (None, None)
    """
    return interp_log(list(zip(xs, ys, strict=True)), x)


def _family(name: str) -> Family:
    return next(f for f in FAMILIES if f.name == name)


def _datasets(names: Iterable[str]) -> list[str]:
    return sorted(names, key=lambda n: (_DS_ORDER.index(n) if n in _DS_ORDER else len(_DS_ORDER), n))


def _runs_by_ds(recs_by_ds: Records, fam: Family) -> dict[str, Runs]:
    """The family's tuned runs per data set, data sets without any left out (in a fixed order)."""
    out = {}
    for ds in _datasets(recs_by_ds):
        runs = {key: r for key, r in tuned(recs_by_ds[ds]).items() if fam.has(key[0])}
        if runs:
            out[ds] = runs
    return out


def _methods(runs: Runs) -> list[MethodKey]:
    return sorted({m for m, _ in runs})


def _series(ax: Axes, runs: Runs, points: list[tuple[float, MethodKey]], label: str, **style: Any) -> None:
    """Mean test AUC over seeds at each x, with the 95% t interval as error bar where there are 2+ seeds."""
    xs, ys, bx, by, be = [], [], [], [], []
    for x, m in sorted(points):
        mean, lo, hi, n = t_interval(list(auc_by_seed(runs, m).values()))
        if n == 0:
            continue
        xs.append(x)
        ys.append(mean)
        if n >= 2:
            bx.append(x)
            by.append(mean)
            be.append(hi - mean)
    if not xs:
        return
    color = style.pop("color", None)
    ax.plot(xs, ys, label=label, lw=1, ms=3, color=color, **{"marker": "o", **style})
    if bx:
        ax.errorbar(bx, by, yerr=be, fmt="none", capsize=2, lw=0.8, ecolor=color)


def _baseline_line(ax: Axes, runs: Runs, m: MethodKey, label: str, color: str = "black", band: bool = True) -> None:
    """The tuned baseline as a horizontal line (dashed without its band), with its 95% t interval as a band."""
    mean, lo, hi, n = t_interval(list(auc_by_seed(runs, m).values()))
    if n == 0:
        return
    ax.axhline(mean, color=color, lw=1, ls="-" if band else "--", label=label)
    if band and n >= 2:
        ax.axhspan(lo, hi, color=color, alpha=0.12, lw=0)


def _log2_d(ax: Axes, ds: Sequence[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ds), [str(d) for d in ds])
    ax.minorticks_off()


def _figure(nrows: int, ncols: int, w: float = 3.0, h: float = 2.5, sharey: str | bool = False) -> tuple[Figure, Any]:
    fig, axes = _plt().subplots(nrows, ncols, figsize=(w * ncols, h * nrows), squeeze=False, sharey=sharey)
    return fig, axes


def _finish(fig: Figure, axes: Any, title: str, out: Path) -> Path:
    """Grid, one figure legend (labels in first-seen order) under the title, and the atomic PNG write."""
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    if handles:
        ncol = min(len(handles), 5)
        fig.legend(list(handles.values()), list(handles), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=ncol)
    _save(fig, out)
    return out


def _empty(ax: Axes) -> None:
    ax.text(0.5, 0.5, "no runs yet", ha="center", va="center", transform=ax.transAxes, color="gray")


def _kd_label(kd: float) -> str:
    return "baseline" if kd == 0 else f"MLET k={kd:g}d"


def _vs_d(ax: Axes, runs: Runs, ms: list[MethodKey], label: Callable[[MethodKey], str], **style: Any) -> None:
    """One line per label, x = d."""
    groups: dict[str, list[tuple[float, MethodKey]]] = defaultdict(list)
    for m in ms:
        groups[label(m)].append((float(m.d), m))
    for lab, pts in groups.items():
        m0 = pts[0][1]
        kw = {"color": _KD_COLOR.get(m0.kd, "gray"), **style, **_EPOCH_STYLE.get(m0.epochs, {})}
        _series(ax, runs, pts, lab, **kw)


def plot_models(recs_by_ds: Records, out: Path) -> Path | None:
    """(a) Test AUC against d per model (columns) and data set (rows): the baseline and MLET k = d, 4d, 16d."""
    fam = _family("models")
    by_ds = _runs_by_ds(recs_by_ds, fam)
    if not by_ds:
        return None
    present = {m.model for runs in by_ds.values() for m, _ in runs}
    models = [m for m in fam.models if m in present]
    fig, axes = _figure(len(by_ds), len(models), sharey="row")
    for i, (ds, runs) in enumerate(by_ds.items()):
        for j, model in enumerate(models):
            ax = axes[i][j]
            ms = [m for m in _methods(runs) if m.model == model]
            if not ms:
                _empty(ax)
            _vs_d(ax, runs, ms, lambda m: _kd_label(m.kd))
            _log2_d(ax, sorted({m.d for m in ms}) or list(fam.ds))
            ax.set_title(f"{ds}: {model}")
            ax.set_xlabel("embedding dim d")
        axes[i][0].set_ylabel(_TEST_AUC)
    return _finish(fig, axes, fam.title, out)


def _one_row(name: str, recs_by_ds: Records, out: Path, draw: Callable[[Axes, str, Runs], None]) -> Path | None:
    """The figure of families (b)-(d): one panel per data set, ``draw(ax, dataset, runs)`` fills each."""
    fam = _family(name)
    by_ds = _runs_by_ds(recs_by_ds, fam)
    if not by_ds:
        return None
    fig, axes = _figure(1, len(by_ds), w=3.4)
    for ax, (ds, runs) in zip(axes[0], by_ds.items(), strict=True):
        draw(ax, ds, runs)
    axes[0][0].set_ylabel(_TEST_AUC)
    return _finish(fig, axes, fam.title, out)


def plot_sigma(recs_by_ds: Records, out: Path) -> Path | None:
    """(b) Test AUC against the W2 initialisation scale σ for MLET, the tuned baseline as a line and band."""

    def draw(ax: Axes, ds: str, runs: Runs) -> None:
        ms = _methods(runs)
        cells = sorted({(m.model, m.epochs, m.d, m.k) for m in ms if m.is_mlet})
        for c in cells:
            pts = [(m.sigma, m) for m in ms if (m.model, m.epochs, m.d, m.k) == c]
            color = _KD_COLOR.get(c[3] / c[2], "tab:blue") if len(cells) > 1 else "tab:blue"
            _series(ax, runs, pts, f"MLET d={c[2]}, k={c[3]}", color=color)
        for b in sorted({m.baseline() for m in ms}):
            _baseline_line(ax, runs, b, f"baseline d={b.d} (95% band)")
        sigmas = sorted({m.sigma for m in ms if m.is_mlet})
        ax.set_xscale("log")
        ax.set_xticks(sigmas, [f"{x:g}" for x in sigmas])
        ax.minorticks_off()
        ax.set_xlabel("W2 init scale σ")
        ax.set_title(f"{ds}: {', '.join(sorted({m.model for m in ms}))}")

    return _one_row("sigma", recs_by_ds, out, draw)


def plot_small_k(recs_by_ds: Records, out: Path) -> Path | None:
    """(c) Test AUC against k/d (0.5, 1, 4) per d, each d's baseline as a dashed line of its colour."""
    kds = [kd for kd in _family("small_k").kds if kd > 0]

    def draw(ax: Axes, ds: str, runs: Runs) -> None:
        ms = _methods(runs)
        for d in sorted({m.d for m in ms}):
            color = _D_COLOR.get(d, "gray")
            _series(ax, runs, [(m.kd, m) for m in ms if m.d == d and m.is_mlet], f"MLET d={d}", color=color)
            for b in sorted({m.baseline() for m in ms if m.d == d}):
                _baseline_line(ax, runs, b, f"baseline d={d}", color=color, band=False)
        ax.set_xscale("log", base=2)
        ax.set_xticks(kds, [f"{kd:g}" for kd in kds])
        ax.minorticks_off()
        ax.set_xlabel("k / d")
        ax.set_title(f"{ds}: deepfm")

    return _one_row("small_k", recs_by_ds, out, draw)


def plot_epochs_width(recs_by_ds: Records, out: Path) -> Path | None:
    """(d) Test AUC against d for 1 and 3 epochs: the baseline and MLET k = 4d (solid: 1 epoch, dashed: 3)."""

    def draw(ax: Axes, ds: str, runs: Runs) -> None:
        ms = _methods(runs)
        _vs_d(ax, runs, ms, lambda m: f"{_kd_label(m.kd)}, {m.epochs} epoch{'s' if m.epochs != 1 else ''}")
        _log2_d(ax, sorted({m.d for m in ms}))
        ax.set_xlabel("embedding dim d")
        ax.set_title(f"{ds}: deepfm")

    return _one_row("epochs_width", recs_by_ds, out, draw)


def lr_curves(records: list[dict[str, Any]], fam: Family) -> dict[MethodKey, list[tuple[float, float]]]:
    """Per method: (sparse lr, validation AUC) of seed 0, each lr at its best dense lr (by :func:`tuned`)."""
    by_lr: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for (m, seed), rs in by_method(records).items():
        if seed == 0 and fam.has(m):
            for r in rs:
                by_lr[float(r["sparse_lr"])].append(r)
    out: dict[MethodKey, list[tuple[float, float]]] = defaultdict(list)
    for lr in sorted(by_lr):
        for (m, _), r in tuned(by_lr[lr]).items():
            out[m].append((lr, float(r["valid"]["auc"])))
    return {m: out[m] for m in sorted(out)}


def plot_lr_equivalence(recs_by_ds: Records, out: Path) -> Path | None:
    """(e) Validation AUC against the effective lr (top), and MLET against the interpolated baseline (bottom)."""
    fam = _family("lr_equivalence")
    curves = {ds: c for ds in _datasets(recs_by_ds) if (c := lr_curves(recs_by_ds[ds], fam))}
    if not curves:
        return None
    fig, axes = _figure(2, len(curves), w=3.4, h=2.9)
    for j, (ds, cur) in enumerate(curves.items()):
        top, bottom = axes[0][j], axes[1][j]
        cells = {(m.d, m.k) for m in cur if m.is_mlet}
        lo_hi: list[float] = []
        for m, pts in cur.items():
            if not m.is_mlet:
                top.plot(*zip(*pts, strict=True), color="black", marker="o", ms=3, lw=1.5, label=f"baseline d={m.d}")
                continue
            scale = m.k * m.sigma**2
            lab = f"MLET σ={m.sigma:g}" + (f" (d={m.d}, k={m.k})" if len(cells) > 1 else "")
            color = _SIGMA_COLOR.get(m.sigma, "gray")
            top.plot([scale * lr for lr, _ in pts], [a for _, a in pts], color=color, marker="o", ms=3, lw=1, label=lab)
            base = cur.get(m.baseline(), [])
            bx, by = [lr for lr, _ in base], [a for _, a in base]
            pairs = [(b, a) for lr, a in pts if (b := interp_log_lr(bx, by, scale * lr)) is not None]
            if pairs:
                bottom.scatter(*zip(*pairs, strict=True), color=color, s=12, label=lab)
                lo_hi += [v for p in pairs for v in p]
        if lo_hi:
            lim = (min(lo_hi) - 0.005, max(lo_hi) + 0.005)
            bottom.plot(lim, lim, color="gray", lw=0.8, ls=":", label="y = x")
            bottom.set_xlim(lim)
            bottom.set_ylim(lim)
        else:
            _empty(bottom)
        top.set_xscale("log")
        top.set_xlabel("effective embedding lr (baseline: η; MLET: k·σ²·η)")
        top.set_title(f"{ds} (seed 0)")
        bottom.set_xlabel("baseline valid AUC at lr k·σ²·η (interpolated)")
        bottom.set_ylabel("MLET valid AUC at lr η")
        bottom.set_aspect("equal", adjustable="box")
    axes[0][0].set_ylabel("valid AUC (best dense lr per η)")
    return _finish(fig, axes, fam.title, out)
