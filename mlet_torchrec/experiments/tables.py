"""The report's per-data-set section: Markdown tables of AUC/LogLoss vs d, frequency splits, cost, verdicts.

Compression and the serving-memory recommendation are in :mod:`.compression_tables`.

Example:
    >>> _section_dataset  # doctest: +ELLIPSIS
    <function _section_dataset at ...>
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from mlet_torchrec.experiments.compression_tables import _compression_section, _recommendation
from mlet_torchrec.experiments.markdown import _mib, _table
from mlet_torchrec.experiments.plots import plot_freq, plot_spectrum, plot_vs_d
from mlet_torchrec.experiments.selection import Pick, Results, _g
from mlet_torchrec.experiments.stats import PairedTest, _get, bh_q, fmt, fmt_p, mean_std, paired_test, verdict


@dataclass(frozen=True)
class _Section:
    """What every part of one data set's section reads: its results, the variant, the methods and where plots go."""

    res: Results
    name: str
    variant: str
    out: Path

    @property
    def plots(self) -> Path:
        return self.out / "plots"

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() else "_" for c in f"{self.name}_{self.variant}".strip("_"))

    @cached_property
    def picks(self) -> list[Pick]:
        return self.res.picks()

    @property
    def paper(self) -> Pick:
        return self.picks[0]

    @property
    def tuned(self) -> Pick | None:
        return next((m for m in self.picks if m.kind == "tuned"), None)

    @property
    def ref(self) -> Pick:
        return self.tuned or self.paper

    @property
    def mlets(self) -> list[Pick]:
        return [m for m in self.picks if m.kind in ("mlet", "mlet_tuned", "mlet_best")]

    @property
    def r0(self) -> dict[str, Any]:
        return self.res.records[0]

    def header(self) -> list[str]:
        """Runs, base config, tuning and test rows."""
        L: list[str] = []
        L += [f"## {self.name}" + (f" ({self.variant})" if self.variant else ""), ""]
        L += [
            f"- runs: {len(self.res.records)} ({sum(r.get('role') == 'tune' for r in self.res.records)} of them "
            f"{'learning-rate' if self.res.mlet_tuned else 'baseline'} tuning runs); d ∈ {self.res.ds}, "
            f"k ∈ {['null'] + self.res.ks}, "
            f"seeds {self.res.seeds}; processes per run: "
            f"{sorted({r.get('nproc') for r in self.res.records}, key=lambda n: (n is None, n or 0))}",
            f"- base config: `{self.r0.get('base_config')}`"
            + (f" with `{' '.join(self.r0['base_overrides'])}`" if self.r0.get("base_overrides") else ""),
            f"- fair baseline: embedding (sparse) learning rate tuned over {self.res.tune_lrs} per (d, seed) on "
            f"**validation** AUC{', for MLET (per k) as for the baseline' if self.res.mlet_tuned else ''}; budget "
            f"{self.res.records[-1].get('budget', 'n/a')}."
            if self.res.has_tuning
            else "- no baseline tuning runs in these results (`--tune-baseline` not given)",
            f"- test rows: {int(_get(self.r0, 'test.rows') or 0)}, "
            f"positive rate {(_get(self.r0, 'test.positive_rate') or 0):.3f}, "
            f"label entropy (LogLoss of a constant) {(_get(self.r0, 'test.label_entropy') or 0):.4f}",
            "",
        ]
        return L

    def summary(self) -> list[str]:
        """MLET against the baseline: paired Δ, plain statements, smaller served tables."""
        L: list[str] = []
        n_seeds = len(self.res.seeds)
        L += ["### Summary: MLET vs the single-layer baseline (test AUC, paired over seeds)", ""]
        L += [
            "Δ = MLET − baseline on the same seed (mean ± std over seeds). Verdict: paired t-test, significant when "
            "its Benjamini-Hochberg q over this table's tests is < 0.05 (the raw p beside it) "
            f"(n = {n_seeds} seeds; with 3 seeds a difference must be about 2.5x its std to count). "
            "'seed std' is the std of the baseline's AUC over seeds.",
            "",
        ]
        tests = [
            (d, m, b, diffs)
            for d in self.res.ds
            for m in self.mlets
            for b in _baselines_for(m, self.res, self.paper, self.tuned)
            if (diffs := self.res.paired(m, b, self.variant, d, "test.auc"))
        ]
        judged = _judged([diffs for *_, diffs in tests])
        judged_of = {(d, m.name, b.name): tq for (d, m, b, _), tq in zip(tests, judged, strict=True)}
        rows = []
        for (d, m, b, diffs), (t, q) in zip(tests, judged, strict=True):
            _, sstd, _ = mean_std(self.res.values(b, self.variant, d, "test.auc"))
            ratio = "–" if not sstd or math.isnan(sstd) else f"{abs(t.mean) / sstd:.1f}"
            rows.append(
                [
                    d,
                    m.name,
                    b.name,
                    fmt(diffs, 4),
                    "–" if math.isnan(sstd) else f"{sstd:.4f}",
                    ratio,
                    fmt_p(t.p, smallest=0.0),
                    fmt_p(q, smallest=0.0),
                    verdict(t, q=q),
                ]
            )
        L += _table(["d", "MLET", "vs", "Δ AUC", "seed std", "abs Δ / seed std", "p", "q (BH)", "verdict"], rows) + [""]
        L += _plain_statements(self.res, self.variant, self.paper, self.tuned, self.mlets, judged_of)
        # smaller d with MLET vs larger d baseline (the papers' headline)
        if len(self.res.ds) > 1:
            rows = []
            for i, d_small in enumerate(self.res.ds):
                for d_big in self.res.ds[i + 1 :]:
                    best = next((m for m in self.mlets if m.kind == "mlet_best"), self.mlets[0] if self.mlets else None)
                    if best is None:
                        continue
                    auc_small = self.res.values(best, self.variant, d_small, "test.auc")
                    auc_big = self.res.values(self.ref, self.variant, d_big, "test.auc")
                    if auc_small and auc_big:
                        rows.append(
                            [
                                f"{best.name}, d={d_small}",
                                f"{self.ref.name}, d={d_big}",
                                fmt(auc_small),
                                fmt(auc_big),
                                f"{statistics.fmean(auc_small) - statistics.fmean(auc_big):+.4f}",
                            ]
                        )
            if rows:
                L += [
                    "Smaller served tables: MLET at a small d against the baseline at a larger d (unpaired means):",
                    "",
                ]
                L += _table(["MLET", "baseline", "MLET AUC", "baseline AUC", "Δ of means"], rows) + [""]
        return L

    def vs_d(self) -> list[str]:
        """AUC and LogLoss against d for each k (paper Fig. 2/3) and the chosen learning rates."""
        L: list[str] = []
        L += ["### AUC and LogLoss vs d for each k (paper Fig. 2/3)", ""]
        for path, label in (("test.auc", "test AUC"), ("test.logloss", "test LogLoss"), ("valid.auc", "valid AUC")):
            L += [f"**{label}** (mean ± std over seeds)", ""]
            L += _table(
                ["method"] + [f"d={d}" for d in self.res.ds],
                [[m.name] + [fmt(self.res.values(m, self.variant, d, path)) for d in self.res.ds] for m in self.picks],
            ) + [""]
        p1 = plot_vs_d(
            self.res,
            self.variant,
            "test.auc",
            "test AUC",
            self.plots / f"{self.slug}_auc_vs_d.png",
            f"{self.name}: AUC vs d",
        )
        p2 = plot_vs_d(
            self.res,
            self.variant,
            "test.logloss",
            "test LogLoss",
            self.plots / f"{self.slug}_logloss_vs_d.png",
            f"{self.name}: LogLoss vs d",
        )
        L += [f"![AUC vs d](plots/{p1}) ![LogLoss vs d](plots/{p2})", ""]
        chosen_by = [m for m in self.picks if m.kind in ("tuned", "mlet_tuned", "mlet_best")] if self.tuned else []
        if chosen_by:
            L += [
                "Embedding learning rate the tuning chose (per seed, on validation AUC; `k=` where k was chosen too):",
                "",
            ]
            rows = []
            for m in chosen_by:
                for d in self.res.ds:
                    picks = [self.res.pick(m, self.variant, d, s) for s in self.res.seeds]
                    rows.append(
                        [m.name, d]
                        + [
                            "–"
                            if r is None
                            else _g(r["sparse_lr"]) + (f" (k={r['k']})" if m.kind == "mlet_best" else "")
                            for r in picks
                        ]
                    )
            L += _table(["method", "d"] + [f"seed {s}" for s in self.res.seeds], rows) + [""]
        return L

    def freq(self) -> list[str]:
        """PR-AUC on the most and least frequent items (paper Table 3)."""
        L: list[str] = []
        f0 = self.r0.get("freq") or {}
        L += ["### PR-AUC on the most and least frequent items (paper Table 3)", ""]
        L += [
            f"Test rows ranked by the train-split count of their ids ({f0.get('rule', 'n/a')}; features: "
            f"{', '.join(f0.get('features', [])) or 'n/a'}); PR-AUC on the top and bottom "
            f"{int(100 * f0.get('fraction', 0.1))}% of rows (train counts in those splits: top "
            f"{(f0.get('top10') or {}).get('min_freq', '?')}..{(f0.get('top10') or {}).get('max_freq', '?')}, bottom "
            f"{(f0.get('bottom10') or {}).get('min_freq', '?')}..{(f0.get('bottom10') or {}).get('max_freq', '?')}; "
            f"positive rates {(f0.get('top10') or {}).get('positive_rate', float('nan')):.3f} / "
            f"{(f0.get('bottom10') or {}).get('positive_rate', float('nan')):.3f}).",
            "",
        ]
        header = ["method"] + [f"{w} d={d}" for d in self.res.ds for w in ("top 10%", "bottom 10%")]
        L += _table(
            header,
            [
                [m.name]
                + [
                    fmt(self.res.values(m, self.variant, d, f"freq.{w}.pr_auc"))
                    for d in self.res.ds
                    for w in ("top10", "bottom10")
                ]
                for m in self.picks
            ],
        ) + [""]
        tests = [
            (d, m, w, diffs)
            for d in self.res.ds
            for m in self.mlets
            for w in ("top10", "bottom10")
            if (diffs := self.res.paired(m, self.ref, self.variant, d, f"freq.{w}.pr_auc"))
        ]
        rows = [
            [
                d,
                m.name,
                w.replace("10", " 10%"),
                fmt(diffs),
                fmt_p(t.p, smallest=0.0),
                fmt_p(q, smallest=0.0),
                verdict(t, q=q),
            ]
            for (d, m, w, diffs), (t, q) in zip(tests, _judged([diffs for *_, diffs in tests]), strict=True)
        ]
        if rows:
            L += [f"Paired Δ PR-AUC, MLET − {self.ref.name} (q: Benjamini-Hochberg over this table's tests):", ""]
            L += _table(["d", "MLET", "rows", "Δ PR-AUC", "p", "q (BH)", "verdict"], rows) + [""]
        p3 = plot_freq(
            self.res, self.variant, self.plots / f"{self.slug}_freq_prauc.png", f"{self.name}: PR-AUC by item frequency"
        )
        L += [f"![PR-AUC by frequency](plots/{p3})", ""]
        return L

    def cost(self) -> list[str]:
        """Time per iteration and memory per (k, d) (paper Table 2)."""
        L: list[str] = []
        L += ["### Time per iteration and memory per (k, d) (paper Table 2)", ""]
        L += [
            "Time: training loop seconds / steps. Peak RSS: "
            + (self.r0.get("peak_rss_source") or "n/a")
            + ". Table MiB: FP32 tables while training (n·k + k·d) and at serving (n·d). "
            "Timings come from a shared 2-core machine with other jobs running: compare within a sweep only, "
            "and expect noise.",
            "",
        ]
        rows = []
        for k in [None] + self.res.ks:
            m = self.paper if k is None else Pick("", "mlet", k)
            for d in self.res.ds:
                rs = [r for s in self.res.seeds if (r := self.res.pick(m, self.variant, d, s)) is not None]
                if not rs:
                    continue
                rows.append(
                    [
                        "null" if k is None else k,
                        d,
                        fmt([_get(r, "seconds_per_iter") for r in rs], 2, 1e3),
                        fmt([_get(r, "peak_rss_mb") for r in rs], 0),
                        _mib(_get(rs[0], "training_table_bytes")),
                        _mib(_get(rs[0], "serving_table_bytes")),
                    ]
                )
        L += _table(["k", "d", "ms / iteration", "peak RSS MiB", "training tables MiB", "serving tables MiB"], rows)
        L += [""]
        return L

    def compression(self) -> list[str]:
        """MLET against SVD; hashing and INT8 (paper Table 4, Fig. 5/7)."""
        L: list[str] = []
        comp = [
            r for r in self.res.records if isinstance(r.get("compression"), dict) and "error" not in r["compression"]
        ]
        failed = [r for r in self.res.records if isinstance(r.get("compression"), dict) and "error" in r["compression"]]
        L += ["### MLET vs SVD (paper Table 4); hashing and INT8 composition (paper Fig. 5/7)", ""]
        if not comp:
            L += [
                "not measured yet: these results hold no `compression` measurements (a sweep with "
                "`--no-compression`). Rerun the sweep without it; the section then fills in.",
                "",
            ]
        else:
            L += _compression_section(self.res, self.variant, comp)
        if failed:
            L += [
                f"({len(failed)} runs' compression measurements failed: {failed[0]['compression']['error'][:200]})",
                "",
            ]
        return L

    def spectrum(self) -> list[str]:
        """Singular values of the collapsed tables."""
        L: list[str] = []
        L += ["### Singular values of the collapsed tables", ""]
        L += [
            "Count of singular values of W (n x d; W = W1·W2 for MLET) above 1% of the largest, mean over seeds; "
            "'all tables' averages the count over tables, 'largest' is the table with the most rows. The maximum "
            "possible count is d. The third number counts the largest table's singular values above 10% of its largest "
            "(the 1% threshold rarely discriminates at these d).",
            "",
        ]
        rows = []
        for m in [x for x in self.picks if x.kind != "mlet_best"]:
            row = [m.name]
            for d in self.res.ds:
                all_c, big_c, big10 = [], [], []
                for s in self.res.seeds:
                    r = self.res.pick(m, self.variant, d, s)
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
        L += _table(["method"] + [f"d={d}: all / largest / largest >10%" for d in self.res.ds], rows) + [""]
        p4 = plot_spectrum(self.res, self.variant, self.plots / f"{self.slug}_spectrum.png", self.name)
        if p4:
            L += [f"![spectrum](plots/{p4})", ""]
        return L


def _judged(cells: Sequence[Sequence[float]]) -> list[tuple[PairedTest, float]]:
    """Each cell's paired test and its Benjamini-Hochberg q over the cells (one table's tests), in their order.

    >>> [(round(t.mean, 3), round(q, 4)) for t, q in _judged([[0.01, 0.012, 0.011], [0.1]])]
    [(0.011, 0.0027), (0.1, nan)]
    """
    tests = [paired_test(diffs) for diffs in cells]
    return list(zip(tests, bh_q([t.p for t in tests]), strict=True))


def _section_dataset(res: Results, name: str, variant: str, out: Path, budgets_mb: Sequence[float]) -> list[str]:
    """One data set's (and variant's) section of the report: runs, summary, the papers' tables and figures."""
    c = _Section(res, name, variant, out)
    L: list[str] = []
    for part in (c.header, c.summary, c.vs_d, c.freq, c.cost, c.compression, c.spectrum):
        L += part()
    L += ["### Recommendation: d and k for a serving-memory budget", ""]
    L += _recommendation(res, variant, budgets_mb)
    return L


def _baselines_for(m: Pick, res: Results, paper: Pick, tuned: Pick | None) -> list[Pick]:
    """What an MLET method is compared with: like with like when MLET's lr is tuned too (paper lr vs paper lr,
    tuned vs tuned); otherwise both baselines."""
    if not res.mlet_tuned:
        return [paper] + ([tuned] if tuned else [])
    return [paper] if m.kind == "mlet" else ([tuned] if tuned else [])


def _plain_statements(
    res: Results,
    variant: str,
    paper: Pick,
    tuned: Pick | None,
    mlets: list[Pick],
    judged: dict[tuple[int, str, str], tuple[PairedTest, float]],
) -> list[str]:
    best = next((m for m in mlets if m.kind == "mlet_best"), mlets[0] if mlets else None)
    if best is None:
        return []
    L = ["In plain words (test AUC, MLET with k chosen on validation):", ""]
    for d in res.ds:
        parts = []
        for b in _baselines_for(best, res, paper, tuned):
            if (d, best.name, b.name) not in judged:  # no paired seeds
                continue
            t, q = judged[(d, best.name, b.name)]
            m, s, n = t.mean, t.std, t.n
            sstd = mean_std(res.values(b, variant, d, "test.auc"))[1]
            v = verdict(t, q=q)
            what = (
                "MLET's advantage holds (paired t-test, Benjamini-Hochberg q < 0.05)"
                if v.startswith("MLET better")
                else "MLET is worse (paired t-test, 95%)"
                if v.startswith("MLET worse")
                else f"the difference is not significant at 95% (paired t-test, {n} seeds)"
            )
            rel = "" if not sstd or math.isnan(sstd) else f", {abs(m) / sstd:.1f}x the baseline's seed std"
            parts.append(f"vs {b.name}: {m:+.4f} ± {s:.4f} over {n} seeds{rel}; {what}")
        L.append(f"- d={d}: " + "; ".join(parts) + ".")
    for method in ([tuned] if tuned else []) + [x for x in mlets if x.kind == "mlet_tuned"]:
        chosen = [r for d in res.ds for s in res.seeds if (r := res.pick(method, variant, d, s)) is not None]
        # the top of the grid as asked (diverged runs are not in the records, but they were tried)
        asked = [v for r in chosen for v in ((r.get("tune") or {}).get("sparse_optimizer.lr") or [])]
        top = max(asked + res.tried_lrs)
        at_top = sum(r["sparse_lr"] == top for r in chosen)
        if chosen and at_top > len(chosen) / 2:
            L.append(
                f"- Caveat: the tuning of {method.name} chose the largest learning rate of its grid ({_g(top)}) in "
                f"{at_top} of {len(chosen)} (d, seed) cells: it is probably not at its best yet, and a wider "
                "grid would likely move it up further."
            )
    n_mlet = len(res.ks)
    n_base = len(res.tune_lrs)
    if tuned and res.mlet_tuned:
        L.append(
            f"- Budget: per (d, seed) the baseline and MLET at each k each had {n_base} runs (one per embedding "
            f"learning rate {', '.join(map(_g, res.tune_lrs))}): equal budgets per k. 'MLET best k, lr' chooses "
            f"among {n_mlet * n_base} runs, so compare the per-k rows for a budget-matched verdict."
        )
    elif tuned:
        L.append(
            f"- Budget: per (d, seed) MLET had {n_mlet} runs (one per k) and the tuned baseline {n_base} "
            f"(one per embedding learning rate {', '.join(map(_g, res.tune_lrs))})"
            + (
                "; the budget favours the baseline."
                if n_base > n_mlet
                else "; equal budgets."
                if n_base == n_mlet
                else "; the budget favours MLET."
            )
        )
    return L + [""]
