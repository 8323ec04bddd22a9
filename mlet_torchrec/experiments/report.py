"""``mlet report RESULTS --out DIR``: Markdown tables and PNG plots from a sweep's results store.

Sections (paper numbering from the MLET paper, seeds/001):
* summary: where MLET beats the single-layer baseline, by how much, against seed noise (paired over seeds);
* AUC and LogLoss vs d for each k (Fig. 2/3), against the baseline "as in the paper" (the config's embedding
  learning rate) and the **tuned baseline** (best validation AUC over the ``--tune-baseline`` grid per (d, seed));
* PR-AUC on the 10% of test rows with the most / least frequent ids (Table 3);
* time per iteration, peak memory and table bytes per (k, d) (Table 2);
* MLET vs SVD (Table 4), hashing and INT8 composition (Fig. 5/7): from ``compression`` measurements when the
  results hold them, otherwise "not measured yet";
* singular values of the collapsed tables (count above 1% of the largest);
* a recommendation of d and k for serving-memory budgets (chosen on validation AUC).

Every number is mean ± sample std over seeds (n given); selections (tuned lr, best k, recommendations) use
the **validation** split only, reported numbers are **test**.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from mlet_torchrec.experiments.sweep import load_results

# two-sided 95% critical values of Student's t by degrees of freedom
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 30: 2.042}


def t95(df: int) -> float:
    if df <= 0:
        return float("inf")
    keys = sorted(_T95)
    for k in keys:
        if df <= k:
            return _T95[k]
    return 1.96


def mean_std(values: Sequence[float]) -> Tuple[float, float, int]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), float("nan"), 0
    m = statistics.fmean(vals)
    s = statistics.stdev(vals) if len(vals) > 1 else float("nan")
    return m, s, len(vals)


def fmt(values: Sequence[float], digits: int = 4, scale: float = 1.0) -> str:
    """``mean ± std`` over seeds (just the mean for one value, ``–`` for none)."""
    m, s, n = mean_std([v * scale for v in values if v is not None])
    if n == 0:
        return "–"
    if n == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _get(rec: Dict[str, Any], path: str) -> Optional[float]:
    node: Any = rec
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return None if node is None else float(node)


# ------------------------------------------------------------------------------------------------ methods


@dataclass
class Method:
    name: str
    kind: str  # 'paper', 'tuned' (baseline); 'mlet' (config's lr), 'mlet_tuned' (lr tuned), 'mlet_best' (MLET)
    k: Optional[int] = None


def _variant(rec: Dict[str, Any]) -> str:
    """Grid values other than d, k, seed and the tuning axes (usually empty)."""
    tune = set(rec.get("tune") or {})
    skip = {"embedding.k", "embedding.d", "train.seed"} | tune
    return " ".join(f"{k}={json.dumps(v)}" for k, v in sorted((rec.get("overrides") or {}).items()) if k not in skip)


class Results:
    """Results of one data set, indexed by (variant, d, seed)."""

    def __init__(self, records: List[Dict[str, Any]], diverged: Sequence[Dict[str, Any]] = ()) -> None:
        self.records = records
        # every embedding lr tried, diverged runs included (a diverged top value still counts as tried)
        self.tried_lrs = sorted({r["sparse_lr"] for r in [*records, *diverged]})
        self.ds = sorted({r["d"] for r in records})
        self.ks = sorted({r["k"] for r in records if r["k"] is not None})
        self.seeds = sorted({r["seed"] for r in records})
        self.variants = sorted({_variant(r) for r in records})
        self.cells: Dict[Tuple[str, int, int], List[Dict[str, Any]]] = defaultdict(list)
        for r in records:
            self.cells[(_variant(r), r["d"], r["seed"])].append(r)
        self.paper_lrs = sorted({r["sparse_lr"] for r in records if r["k"] is None and r.get("role") == "grid"})
        self.tune_lrs = sorted({r["sparse_lr"] for r in records if r["k"] is None})
        self.has_tuning = any(r.get("role") == "tune" and r["k"] is None for r in records)
        # `mlet sweep --tune`: MLET's learning rate tuned over the same grid as the baseline's
        self.mlet_tuned = any(r.get("role") == "tune" and r["k"] is not None for r in records)

    def methods(self) -> List[Method]:
        lrs = "{" + ", ".join(map(_g, self.tune_lrs)) + "}"
        out = [Method(f"baseline (paper lr {','.join(map(_g, self.paper_lrs))})", "paper")]
        if self.has_tuning:
            out.append(Method(f"baseline (tuned lr ∈ {lrs})", "tuned"))
        paper_lr = f" (paper lr {','.join(map(_g, self.paper_lrs))})" if self.mlet_tuned else ""
        out += [Method(f"MLET k={k}{paper_lr}", "mlet", k) for k in self.ks]
        if self.mlet_tuned:
            out += [Method(f"MLET k={k} (tuned lr)", "mlet_tuned", k) for k in self.ks]
        if len(self.ks) > 1 or self.mlet_tuned:
            out.append(Method("MLET best k, lr (valid)" if self.mlet_tuned else "MLET best k (valid)", "mlet_best"))
        return out

    def pick(self, method: Method, variant: str, d: int, seed: int) -> Optional[Dict[str, Any]]:
        runs = self.cells.get((variant, d, seed), [])
        base = [r for r in runs if r["k"] is None]
        if method.kind == "paper":
            c = [r for r in base if r.get("role") == "grid"]
            return c[0] if c else None
        if method.kind == "tuned":
            return _best_valid(base)
        if method.kind == "mlet":
            c = [r for r in runs if r["k"] == method.k]
            grid = [r for r in c if r.get("role", "grid") == "grid"]
            return (grid or c or [None])[0]
        if method.kind == "mlet_tuned":
            return _best_valid([r for r in runs if r["k"] == method.k])
        if method.kind == "mlet_best":
            return _best_valid([r for r in runs if r["k"] is not None])
        raise ValueError(method.kind)

    def values(self, method: Method, variant: str, d: int, path: str) -> List[float]:
        out = []
        for s in self.seeds:
            r = self.pick(method, variant, d, s)
            v = None if r is None else _get(r, path)
            if v is not None:
                out.append(v)
        return out

    def paired(self, a: Method, b: Method, variant: str, d: int, path: str) -> List[float]:
        """Per-seed differences a - b (seeds where both exist)."""
        out = []
        for s in self.seeds:
            ra, rb = self.pick(a, variant, d, s), self.pick(b, variant, d, s)
            if ra is None or rb is None:
                continue
            va, vb = _get(ra, path), _get(rb, path)
            if va is not None and vb is not None:
                out.append(va - vb)
        return out


def _g(x: float) -> str:
    return f"{x:g}"


def _best_valid(runs: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    scored = [(_get(r, "valid.auc"), r) for r in runs]
    scored = [(v, r) for v, r in scored if v is not None and not math.isnan(v)]
    if not scored:
        return runs[0] if runs else None
    return max(scored, key=lambda x: x[0])[1]


def verdict(diffs: Sequence[float], higher_is_better: bool = True) -> str:
    m, s, n = mean_std(diffs)
    if n < 2 or math.isnan(s):
        return "n<2: no test"
    if s == 0:
        return "identical" if m == 0 else ("MLET better" if (m > 0) == higher_is_better else "MLET worse")
    t = m / (s / math.sqrt(n))
    if abs(t) < t95(n - 1):
        return f"within noise (t={t:+.1f})"
    return f"MLET {'better' if (t > 0) == higher_is_better else 'worse'} (t={t:+.1f}, p<0.05)"


# ------------------------------------------------------------------------------------------------ plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 8, "figure.dpi": 80})
    return plt


def _save(fig, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name



_STYLES = {"paper": dict(ls="--", marker="s", color="k"), "tuned": dict(ls="-", marker="s", color="k")}


def _series_vs_d(ax, res: "Results", variant: str, path: str) -> None:
    """One line per method (mean ± std over seeds of ``path``) against d on a log2 axis."""
    for m in res.methods():
        if m.kind == "mlet_best":
            continue
        xs, ys, es = [], [], []
        for d in res.ds:
            mm, ss, n = mean_std(res.values(m, variant, d, path))
            if n:
                xs.append(d), ys.append(mm), es.append(0 if math.isnan(ss) else ss)
        ax.errorbar(xs, ys, yerr=es, capsize=2, label=m.name, lw=1, ms=3, **_STYLES.get(m.kind, dict(marker="o")))
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


def plot_spectrum(res: Results, variant: str, out: Path, title: str) -> Optional[str]:
    d = max(res.ds)
    seed = res.seeds[0]
    runs = res.cells.get((variant, d, seed), [])
    if not runs or "spectrum" not in runs[0]:
        return None
    table = max(runs[0]["spectrum"], key=lambda t: runs[0]["spectrum"][t]["rows"])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    for m in res.methods():
        if m.kind == "mlet_best" or (res.mlet_tuned and m.kind in ("paper", "mlet")):
            continue
        r = res.pick(m, variant, d, seed)
        if r is None:
            continue
        s = r["spectrum"][table]["singular_values"]
        ax.semilogy(range(1, len(s) + 1), [x / s[0] for x in s], marker="o", ms=3, lw=1, label=m.name,
                    **({"color": "k", "ls": "--"} if m.kind == "paper" else {}))
    ax.axhline(0.01, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("index")
    ax.set_ylabel("σ_i / σ_1")
    ax.set_title(f"{title}: singular values of collapsed {table} ({runs[0]['spectrum'][table]['rows']} rows), "
                 f"d={d}, seed {seed}", fontsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    return _save(fig, out)


# ------------------------------------------------------------------------------------------------ markdown


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _mib(b: Optional[float]) -> str:
    return "–" if b is None else f"{b / 2**20:.2f}"


def _section_dataset(res: Results, name: str, variant: str, out: Path, budgets_mb: Sequence[float]) -> List[str]:
    slug = "".join(c if c.isalnum() else "_" for c in f"{name}_{variant}".strip("_"))
    plots = out / "plots"
    L: List[str] = []
    methods = res.methods()
    paper = methods[0]
    tuned = next((m for m in methods if m.kind == "tuned"), None)
    ref = tuned or paper
    mlets = [m for m in methods if m.kind in ("mlet", "mlet_tuned", "mlet_best")]
    r0 = res.records[0]
    n_seeds = len(res.seeds)

    L += [f"## {name}" + (f" ({variant})" if variant else ""), ""]
    L += [f"- runs: {len(res.records)} ({sum(r.get('role') == 'tune' for r in res.records)} of them "
          f"{'learning-rate' if res.mlet_tuned else 'baseline'} tuning runs); d ∈ {res.ds}, k ∈ {['null'] + res.ks}, seeds {res.seeds}; processes per run: "
          f"{sorted({r.get('nproc') for r in res.records})}",
          f"- base config: `{r0.get('base_config')}`" + (f" with `{' '.join(r0['base_overrides'])}`"
                                                          if r0.get("base_overrides") else ""),
          f"- fair baseline: embedding (sparse) learning rate tuned over {res.tune_lrs} per (d, seed) on "
          f"**validation** AUC{', for MLET (per k) as for the baseline' if res.mlet_tuned else ''}; budget "
          f"{res.records[-1].get('budget', 'n/a')}." if res.has_tuning else
          "- no baseline tuning runs in these results (`--tune-baseline` not given)",
          f"- test rows: {int(_get(r0, 'test.rows') or 0)}, positive rate {(_get(r0, 'test.positive_rate') or 0):.3f}, "
          f"label entropy (LogLoss of a constant) {(_get(r0, 'test.label_entropy') or 0):.4f}",
          ""]

    # ---- summary
    L += ["### Summary: MLET vs the single-layer baseline (test AUC, paired over seeds)", ""]
    L += ["Δ = MLET − baseline on the same seed (mean ± std over seeds). Verdict: paired t-test at 95% "
          f"(n = {n_seeds} seeds; with 3 seeds a difference must be about 2.5x its std to count). "
          "'seed std' is the std of the baseline's AUC over seeds.", ""]
    rows = []
    for d in res.ds:
        for m in mlets:
            for b in _baselines_for(m, res, paper, tuned):
                diffs = res.paired(m, b, variant, d, "test.auc")
                if not diffs:
                    continue
                _, sstd, _ = mean_std(res.values(b, variant, d, "test.auc"))
                dm, _, _ = mean_std(diffs)
                ratio = "–" if not sstd or math.isnan(sstd) else f"{abs(dm) / sstd:.1f}"
                rows.append([d, m.name, b.name, fmt(diffs, 4), "–" if math.isnan(sstd) else f"{sstd:.4f}", ratio,
                             verdict(diffs)])
    L += _table(["d", "MLET", "vs", "Δ AUC", "seed std", "|Δ|/seed std", "verdict"], rows) + [""]
    L += _plain_statements(res, variant, paper, tuned, mlets)
    # smaller d with MLET vs larger d baseline (the papers' headline)
    if len(res.ds) > 1:
        rows = []
        for i, d_small in enumerate(res.ds):
            for d_big in res.ds[i + 1:]:
                best = next((m for m in mlets if m.kind == "mlet_best"), mlets[0] if mlets else None)
                if best is None:
                    continue
                a = res.values(best, variant, d_small, "test.auc")
                b = res.values(ref, variant, d_big, "test.auc")
                if a and b:
                    rows.append([f"{best.name}, d={d_small}", f"{ref.name}, d={d_big}", fmt(a), fmt(b),
                                 f"{statistics.fmean(a) - statistics.fmean(b):+.4f}"])
        if rows:
            L += ["Smaller served tables: MLET at a small d against the baseline at a larger d (unpaired means):", ""]
            L += _table(["MLET", "baseline", "MLET AUC", "baseline AUC", "Δ of means"], rows) + [""]

    # ---- Fig 2/3
    L += ["### AUC and LogLoss vs d for each k (paper Fig. 2/3)", ""]
    for path, label in (("test.auc", "test AUC"), ("test.logloss", "test LogLoss"), ("valid.auc", "valid AUC")):
        L += [f"**{label}** (mean ± std over seeds)", ""]
        L += _table(["method"] + [f"d={d}" for d in res.ds],
                    [[m.name] + [fmt(res.values(m, variant, d, path)) for d in res.ds] for m in methods]) + [""]
    p1 = plot_vs_d(res, variant, "test.auc", "test AUC", plots / f"{slug}_auc_vs_d.png", f"{name}: AUC vs d")
    p2 = plot_vs_d(res, variant, "test.logloss", "test LogLoss", plots / f"{slug}_logloss_vs_d.png",
                   f"{name}: LogLoss vs d")
    L += [f"![AUC vs d](plots/{p1}) ![LogLoss vs d](plots/{p2})", ""]
    chosen_by = [m for m in methods if m.kind in ("tuned", "mlet_tuned", "mlet_best")] if tuned else []
    if chosen_by:
        L += ["Embedding learning rate the tuning chose (per seed, on validation AUC; `k=` where k was chosen too):", ""]
        rows = []
        for m in chosen_by:
            for d in res.ds:
                picks = [res.pick(m, variant, d, s) for s in res.seeds]
                rows.append([m.name, d] + ["–" if r is None else _g(r["sparse_lr"])
                                           + (f" (k={r['k']})" if m.kind == "mlet_best" else "") for r in picks])
        L += _table(["method", "d"] + [f"seed {s}" for s in res.seeds], rows) + [""]

    # ---- Table 3
    f0 = r0.get("freq") or {}
    L += ["### PR-AUC on the most and least frequent items (paper Table 3)", ""]
    L += [f"Test rows ranked by the train-split count of their ids ({f0.get('rule', 'n/a')}; features: "
          f"{', '.join(f0.get('features', [])) or 'n/a'}); PR-AUC on the top and bottom "
          f"{int(100 * f0.get('fraction', 0.1))}% of rows (train counts in those splits: top "
          f"{(f0.get('top10') or {}).get('min_freq', '?')}..{(f0.get('top10') or {}).get('max_freq', '?')}, bottom "
          f"{(f0.get('bottom10') or {}).get('min_freq', '?')}..{(f0.get('bottom10') or {}).get('max_freq', '?')}; "
          f"positive rates {(f0.get('top10') or {}).get('positive_rate', float('nan')):.3f} / "
          f"{(f0.get('bottom10') or {}).get('positive_rate', float('nan')):.3f}).", ""]
    header = ["method"] + [f"{w} d={d}" for d in res.ds for w in ("top 10%", "bottom 10%")]
    L += _table(header, [[m.name] + [fmt(res.values(m, variant, d, f"freq.{w}.pr_auc"))
                                     for d in res.ds for w in ("top10", "bottom10")] for m in methods]) + [""]
    rows = []
    for d in res.ds:
        for m in mlets:
            for w in ("top10", "bottom10"):
                diffs = res.paired(m, ref, variant, d, f"freq.{w}.pr_auc")
                if diffs:
                    rows.append([d, m.name, w.replace("10", " 10%"), fmt(diffs), verdict(diffs)])
    if rows:
        L += [f"Paired Δ PR-AUC, MLET − {ref.name}:", ""]
        L += _table(["d", "MLET", "rows", "Δ PR-AUC", "verdict"], rows) + [""]
    p3 = plot_freq(res, variant, plots / f"{slug}_freq_prauc.png", f"{name}: PR-AUC by item frequency")
    L += [f"![PR-AUC by frequency](plots/{p3})", ""]

    # ---- Table 2
    L += ["### Time per iteration and memory per (k, d) (paper Table 2)", ""]
    L += ["Time: training loop seconds / steps. Peak RSS: " + (r0.get("peak_rss_source") or "n/a") +
          ". Table MiB: FP32 tables while training (n·k + k·d) and at serving (n·d). "
          "Timings come from a shared 2-core machine with other jobs running: compare within a sweep only, "
          "and expect noise.", ""]
    rows = []
    for k in [None] + res.ks:
        m = paper if k is None else Method("", "mlet", k)
        for d in res.ds:
            rs = [res.pick(m, variant, d, s) for s in res.seeds]
            rs = [r for r in rs if r is not None]
            if not rs:
                continue
            rows.append(["null" if k is None else k, d, fmt([_get(r, "seconds_per_iter") for r in rs], 2, 1e3),
                         fmt([_get(r, "peak_rss_mb") for r in rs], 0), _mib(_get(rs[0], "training_table_bytes")),
                         _mib(_get(rs[0], "serving_table_bytes"))])
    L += _table(["k", "d", "ms / iteration", "peak RSS MiB", "training tables MiB", "serving tables MiB"], rows)
    L += [""]

    # ---- Table 4, Fig 5/7
    comp = [r for r in res.records if isinstance(r.get("compression"), dict) and "error" not in r["compression"]]
    failed = [r for r in res.records if isinstance(r.get("compression"), dict) and "error" in r["compression"]]
    L += ["### MLET vs SVD (paper Table 4); hashing and INT8 composition (paper Fig. 5/7)", ""]
    if not comp:
        L += ["not measured yet: these results hold no `compression` measurements (`mlet_torchrec.serving.compression` "
              "did not exist, or had no `sweep_measurements`, when the runs were made). Rerun the sweep with it "
              "present; the section then fills in.", ""]
    else:
        L += _compression_section(res, variant, comp)
    if failed:
        L += [f"({len(failed)} runs' compression measurements failed: {failed[0]['compression']['error'][:200]})", ""]

    # ---- spectrum
    L += ["### Singular values of the collapsed tables", ""]
    L += ["Count of singular values of W (n x d; W = W1·W2 for MLET) above 1% of the largest, mean over seeds; "
          "'all tables' averages the count over tables, 'largest' is the table with the most rows. The maximum "
          "possible count is d. The third number counts the largest table's singular values above 10% of its largest "
          "(the 1% threshold rarely discriminates at these d).", ""]
    rows = []
    for m in [x for x in methods if x.kind != "mlet_best"]:
        row = [m.name]
        for d in res.ds:
            all_c, big_c, big10 = [], [], []
            for s in res.seeds:
                r = res.pick(m, variant, d, s)
                if r is None or "spectrum" not in r:
                    continue
                sp = r["spectrum"]
                all_c.append(statistics.fmean(v["above_1pct"] for v in sp.values()))
                big = sp[max(sp, key=lambda t: sp[t]["rows"])]
                big_c.append(big["above_1pct"])
                sv = big["singular_values"]
                big10.append(sum(x > 0.1 * sv[0] for x in sv) if sv else 0)
            row.append(f"{fmt(all_c, 1)} / {fmt(big_c, 1)} / {fmt(big10, 1)}" if all_c else "–")
        rows.append(row)
    L += _table(["method"] + [f"d={d}: all / largest / largest >10%" for d in res.ds], rows) + [""]
    p4 = plot_spectrum(res, variant, plots / f"{slug}_spectrum.png", name)
    if p4:
        L += [f"![spectrum](plots/{p4})", ""]

    # ---- recommendation
    L += ["### Recommendation: d and k for a serving-memory budget", ""]
    L += _recommendation(res, variant, budgets_mb)
    return L


def _baselines_for(m: Method, res: Results, paper: Method, tuned: Optional[Method]) -> List[Method]:
    """What an MLET method is compared with: like with like when MLET's lr is tuned too (paper lr vs paper lr,
    tuned vs tuned); otherwise both baselines."""
    if not res.mlet_tuned:
        return [paper] + ([tuned] if tuned else [])
    return [paper] if m.kind == "mlet" else ([tuned] if tuned else [])


def _plain_statements(res: Results, variant: str, paper: Method, tuned: Optional[Method],
                      mlets: List[Method]) -> List[str]:
    best = next((m for m in mlets if m.kind == "mlet_best"), mlets[0] if mlets else None)
    if best is None:
        return []
    L = ["In plain words (test AUC, MLET with k chosen on validation):", ""]
    for d in res.ds:
        parts = []
        for b in _baselines_for(best, res, paper, tuned):
            diffs = res.paired(best, b, variant, d, "test.auc")
            if not diffs:
                continue
            m, s, n = mean_std(diffs)
            sstd = mean_std(res.values(b, variant, d, "test.auc"))[1]
            v = verdict(diffs)
            what = ("MLET's advantage holds (paired t-test, 95%)" if v.startswith("MLET better") else
                    "MLET is worse (paired t-test, 95%)" if v.startswith("MLET worse") else
                    f"the difference is not significant at 95% (paired t-test, {n} seeds)")
            rel = "" if not sstd or math.isnan(sstd) else f", {abs(m) / sstd:.1f}x the baseline's seed std"
            parts.append(f"vs {b.name}: {m:+.4f} ± {s:.4f} over {n} seeds{rel}; {what}")
        L.append(f"- d={d}: " + "; ".join(parts) + ".")
    for m in ([tuned] if tuned else []) + [x for x in mlets if x.kind == "mlet_tuned"]:
        chosen = [res.pick(m, variant, d, s) for d in res.ds for s in res.seeds]
        chosen = [r for r in chosen if r is not None]
        # the top of the grid as asked (diverged runs are not in the records, but they were tried)
        asked = [v for r in chosen for v in ((r.get("tune") or {}).get("sparse_optimizer.lr") or [])]
        top = max(asked + res.tried_lrs)
        at_top = sum(r["sparse_lr"] == top for r in chosen)
        if chosen and at_top > len(chosen) / 2:
            L.append(f"- Caveat: the tuning of {m.name} chose the largest learning rate of its grid ({_g(top)}) in "
                     f"{at_top} of {len(chosen)} (d, seed) cells: it is probably not at its best yet, and a wider "
                     "grid would likely move it up further.")
    n_mlet = len(res.ks)
    n_base = len(res.tune_lrs)
    if tuned and res.mlet_tuned:
        L.append(f"- Budget: per (d, seed) the baseline and MLET at each k each had {n_base} runs (one per embedding "
                 f"learning rate {', '.join(map(_g, res.tune_lrs))}): equal budgets per k. 'MLET best k, lr' chooses "
                 f"among {n_mlet * n_base} runs, so compare the per-k rows for a budget-matched verdict.")
    elif tuned:
        L.append(f"- Budget: per (d, seed) MLET had {n_mlet} runs (one per k) and the tuned baseline {n_base} "
                 f"(one per embedding learning rate {', '.join(map(_g, res.tune_lrs))})"
                 + ("; the budget favours the baseline." if n_base > n_mlet else
                    "; equal budgets." if n_base == n_mlet else "; the budget favours MLET."))
    return L + [""]


def _compression_section(res: Results, variant: str, comp: List[Dict[str, Any]]) -> List[str]:
    """INT8 composition (Fig. 7) and MLET vs SVD (Table 4) from the runs' ``compression`` measurements."""
    L: List[str] = []
    methods = [m for m in res.methods() if m.kind in ("paper", "tuned", "mlet", "mlet_tuned")]
    L += ["Table size is relative to a d = 1 FP32 model (paper A.4.4): FP32 d-dim tables are d, INT8 about d/4. "
          "Test AUC, mean ± std over seeds.", ""]
    L += ["**INT8 post-training quantization of the collapsed tables** (paper Fig. 7)", ""]
    rows = []
    for m in methods:
        for d in res.ds:
            fp = res.values(m, variant, d, "compression.fp32.auc")
            if not fp:
                continue
            size32 = res.values(m, variant, d, "compression.fp32.table_size")
            size8 = res.values(m, variant, d, "compression.int8 grid.table_size")
            q = [a - b for a, b in zip(res.values(m, variant, d, "compression.int8 grid.auc"), fp)]
            rows.append([m.name, d, f"{statistics.fmean(size32):.2f} → {statistics.fmean(size8):.2f}" if size8 else "–",
                         fmt(fp), fmt(res.values(m, variant, d, "compression.int8 maxabs.auc")),
                         fmt(res.values(m, variant, d, "compression.int8 grid.auc")), fmt(q)])
    L += _table(["method", "d", "size FP32 → INT8", "AUC FP32", "AUC INT8 max-abs", "AUC INT8 grid",
                 "Δ AUC (grid − FP32)"], rows) + [""]
    L += ["**MLET vs low-rank SVD of the trained single-layer tables** (paper Table 4): the baseline at d is "
          "trained, then every table is replaced by its best rank-r approximation (stored as n·r + r·d); MLET "
          "is trained at d = r directly.", ""]
    rows = []
    ref = next((m for m in res.methods() if m.kind == "tuned"), res.methods()[0])
    for d in res.ds:
        for r in sorted({int(k.split()[-1]) for rec in comp for k in rec["compression"] if k.startswith("svd rank")}):
            key = f"compression.svd rank {r}"
            auc = res.values(ref, variant, d, f"{key}.auc")
            if not auc:
                continue
            size = res.values(ref, variant, d, f"{key}.table_size")
            mlet_txt = "–"
            if r in res.ds:
                best = [m for m in res.methods() if m.kind == "mlet_best"] or [m for m in methods if m.kind == "mlet"]
                if best:
                    mv = res.values(best[0], variant, r, "compression.fp32.auc") or res.values(best[0], variant, r, "test.auc")
                    ms = res.values(best[0], variant, r, "compression.fp32.table_size")
                    mlet_txt = f"{fmt(mv)} (size {statistics.fmean(ms):.2f}, {best[0].name})" if ms else fmt(mv)
            rows.append([f"{ref.name}, d={d}", r, f"{statistics.fmean(size):.2f}", fmt(auc),
                         fmt(res.values(ref, variant, d, "compression.fp32.auc")), mlet_txt])
    if rows:
        L += _table(["baseline", "SVD rank r", "SVD size", "AUC after SVD", "AUC before (FP32)", "MLET at d = r"],
                    rows) + [""]
    else:
        L += ["no SVD measurements (single-layer runs with d >= 2 needed)", ""]
    if not any(r.get("data_hashing") for r in res.records):
        L += ["**Hashing** (paper Fig. 5): see the section 'Hashing, smaller d and INT8' when the results hold "
              "runs on hashed data sets (`python -m mlet_torchrec.serving.compression hash ...`, then a sweep with "
              "`data.path` on the hashed copy).", ""]
    return L


def _recommendation(res: Results, variant: str, budgets_mb: Sequence[float]) -> List[str]:
    options = []  # (serving bytes, method, d, mean valid auc, test values)
    for d in res.ds:
        for m in res.methods():
            if m.kind in ("mlet_best", "paper") and any(x.kind == "tuned" for x in res.methods()):
                continue
            if m.kind == "mlet" and res.mlet_tuned:
                continue
            if m.kind == "mlet_best":
                continue
            rs = [res.pick(m, variant, d, s) for s in res.seeds]
            rs = [r for r in rs if r is not None]
            if not rs or _get(rs[0], "serving_table_bytes") is None:
                continue
            va = mean_std([_get(r, "valid.auc") for r in rs])[0]
            options.append((_get(rs[0], "serving_table_bytes"), m, d, va, [_get(r, "test.auc") for r in rs]))
    if not options:
        return ["no runs with table sizes", ""]
    budgets = sorted({o[0] for o in options} | {b * 2**20 for b in budgets_mb})
    rows = []
    for b in budgets:
        fit = [o for o in options if o[0] <= b + 1e-9]
        if not fit:
            rows.append([_mib(b), "nothing fits", "", "", ""])
            continue
        best = max(fit, key=lambda o: o[3])
        base_same_d = [o for o in fit if o[2] == best[2] and o[1].kind in ("tuned", "paper")]
        base_txt = "–"
        if base_same_d and best[1].kind in ("mlet", "mlet_tuned"):
            bo = base_same_d[0]
            diffs = res.paired(best[1], bo[1], variant, best[2], "test.auc")
            base_txt = f"{fmt(diffs)} ({verdict(diffs)})"
        rows.append([_mib(b), f"d={best[2]}, " + ("k=null (single layer)" if best[1].kind not in ("mlet", "mlet_tuned")
                                                  else f"k={best[1].k}") + f" [{best[1].name}]",
                     f"{best[3]:.4f}", fmt(best[4]), base_txt])
    lines = ["For each serving budget (FP32 tables; every d's size and any `--budget-mb` given), the (d, k) with "
             "the best mean **validation** AUC among the runs whose served tables fit; its test AUC; and, when it "
             "is MLET, its paired test-AUC gain over the tuned baseline at the same d. The served model is d-dim "
             "either way (MLET collapses), so k costs only training memory and time (Table 2). When the gain is "
             "'within noise', train the single-layer baseline with a tuned embedding learning rate instead.", ""]
    lines += _table(["budget MiB", "choose", "valid AUC", "test AUC", "Δ vs baseline at same d"], rows) + [""]
    return lines


def _hash_label(rec: Dict[str, Any]) -> str:
    h = rec.get("data_hashing") or {}
    moduli, orig = h.get("moduli") or {}, h.get("original_cardinalities") or {}
    if not moduli:
        return "un-hashed"
    fracs = sorted({round(moduli[f] / orig[f], 4) for f in moduli if orig.get(f)})
    share = ", ".join(f"{x:g}" for x in fracs)
    return f"hashed: {', '.join(sorted(moduli))} to {share} of their rows"


def _hashing_section(recs: List[Dict[str, Any]], name: str, out: Path) -> List[str]:
    """Hashing vs smaller d vs MLET, with and without INT8 (paper Fig. 5/7): test AUC against served table size
    relative to d = 1 un-hashed FP32 (A.4.4), from every variant of one data set."""
    by_label: Dict[str, Results] = {}
    for label in sorted({_hash_label(r) for r in recs}):
        by_label[label] = Results([r for r in recs if _hash_label(r) == label])
    base = by_label.get("un-hashed")
    points = []  # (method, label, d, size32, auc32, size8, auc8)
    for label, res in by_label.items():
        variant = res.variants[0] if res.variants else ""
        for m in res.methods():
            wanted = {"paper": not res.has_tuning, "tuned": True, "mlet": not res.mlet_tuned, "mlet_tuned": True}
            if not wanted.get(m.kind, False):
                continue
            for d in res.ds:
                a32 = res.values(m, variant, d, "compression.fp32.auc") or res.values(m, variant, d, "test.auc")
                s32 = res.values(m, variant, d, "compression.fp32.table_size")
                if not a32 or not s32:
                    continue
                a8 = res.values(m, variant, d, "compression.int8 grid.auc")
                s8 = res.values(m, variant, d, "compression.int8 grid.table_size")
                points.append((m, label, d, statistics.fmean(s32), a32, statistics.fmean(s8) if s8 else None, a8))
    hashed = [p for p in points if p[1] != "un-hashed"]
    if not hashed:
        return []
    L = [f"## {name}: hashing, smaller d and INT8 (paper Fig. 5/7)", ""]
    L += ["Three ways to shrink the served tables, alone and combined: train at a smaller d; hash ids (modulo) so "
          "the largest tables have fewer rows, training on the hashed data; quantize the collapsed tables to INT8 "
          "(grid-searched scale). Size is relative to d = 1, un-hashed, FP32 (paper A.4.4). Test AUC, mean ± std "
          "over seeds; each method at its tuned learning rate where the results tune it (chosen on validation).", ""]
    rows = [[m.name, label, d, f"{s32:.2f}", fmt(a32), "–" if s8 is None else f"{s8:.2f}", fmt(a8)]
            for m, label, d, s32, a32, s8, a8 in sorted(points, key=lambda p: (p[0].kind, p[0].k or 0, p[1], p[2]))]
    L += _table(["method", "data", "d", "size FP32", "AUC FP32", "size INT8", "AUC INT8"], rows) + [""]
    if base is not None:
        L += ["Each hashed model against the same method un-hashed at the smallest d whose tables are at least as "
              "large (hashing wins where it is better at a smaller size):", ""]
        for m, label, d, s32, a32, _, _ in hashed:
            ref = [p for p in points if p[0].kind == m.kind and p[0].k == m.k and p[1] == "un-hashed"]
            larger = [p for p in ref if p[3] >= s32]
            if larger:
                p = min(larger, key=lambda p: p[3])
                diff = statistics.fmean(a32) - statistics.fmean(p[4])
                L.append(f"- {m.name}, {label}, d={d} (size {s32:.2f}): {fmt(a32)}; un-hashed d={p[2]} (size "
                         f"{p[3]:.2f}): {fmt(p[4])}; Δ of means {diff:+.4f}.")
        L.append("")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    families = sorted({(m.kind, m.k, m.name) for m, *_ in points}, key=lambda x: (x[0], x[1] or 0))
    for i, (kind, k, mname) in enumerate(families):
        color = f"C{i}"
        short = re.sub(r" ∈ \{[^}]*\}", "", mname)  # the lr grid is in the table, not the legend
        fam = [p for p in points if p[0].kind == kind and p[0].k == k]
        for label in sorted({p[1] for p in fam}):
            ps = sorted((p for p in fam if p[1] == label), key=lambda p: p[3])
            style = "-" if label == "un-hashed" else ":"
            what = "smaller d" if label == "un-hashed" else "hashed"
            ax.errorbar([p[3] for p in ps], [statistics.fmean(p[4]) for p in ps],
                        yerr=[mean_std(p[4])[1] if len(p[4]) > 1 else 0 for p in ps], color=color, ls=style,
                        marker="o", ms=3, lw=1, capsize=2, label=f"{short}, {what}")
            q = [p for p in ps if p[5] is not None and p[6]]
            if q:
                ax.plot([p[5] for p in q], [statistics.fmean(p[6]) for p in q], color=color, ls="none", marker="x",
                        ms=4)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("served table size (relative to d = 1 FP32, un-hashed); x: INT8")
    ax.set_ylabel("test AUC")
    ax.set_title(f"{name}: hashing, d and INT8", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=5)
    slug = "".join(c if c.isalnum() else "_" for c in name)
    path = _save(fig, out / "plots" / f"{slug}_hashing.png")
    L += [f"![hashing](plots/{path})", ""]
    return L


def render_report(results: Sequence[Path | str] | Path | str, out: Path | str, title: Optional[str] = None,
                  budget_mb: Optional[Sequence[float]] = None) -> Path:
    """Render ``out/report.md`` and ``out/plots/*.png`` from one or more results stores."""
    paths = [results] if isinstance(results, (str, Path)) else list(results)
    everything = [r for p in paths for r in load_results(p)]
    records = [r for r in everything if r.get("status") == "ok"]
    diverged = [r for r in everything if r.get("status") == "diverged"]
    if not records:
        raise ValueError(f"no finished runs in {', '.join(map(str, paths))}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    by_ds: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_ds[r.get("dataset") or "data"].append(r)
    L = [f"# {title or 'MLET sweep report: ' + ', '.join(sorted(by_ds))}", "",
         f"Generated by `mlet report {' '.join(map(str, paths))} --out {out}` from {len(records)} runs. "
         "Numbers are test-split mean ± sample std over seeds; every selection (tuned learning rate, best k, "
         "recommendation) uses the validation split only."
         + (" Exact commands and seeds: [COMMANDS.md](COMMANDS.md)." if (out / "COMMANDS.md").exists() else ""), ""]
    for name, recs in sorted(by_ds.items()):
        res_all = Results(recs)
        gone = [r for r in diverged if (r.get("dataset") or "data") == name]
        for variant in res_all.variants:
            res = Results([r for r in recs if _variant(r) == variant], [r for r in gone if _variant(r) == variant])
            L += _section_dataset(res, name, variant, out, budget_mb or [])
        L += _hashing_section(recs, name, out)
        if gone:
            L += [f"**{name}: {len(gone)} run(s) diverged** (the NaN guard stopped them; they count as never chosen): "
                  + ", ".join(sorted({f"d={r['d']} k={'null' if r['k'] is None else r['k']} lr={_g(r['sparse_lr'])}"
                                      for r in gone})) + ".", ""]
    report = out / "report.md"
    report.write_text("\n".join(L) + "\n")
    return report
