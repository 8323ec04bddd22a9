"""The report's compression tables (INT8, MLET against SVD) and its serving-memory recommendation.

Example:
    >>> _recommendation  # doctest: +ELLIPSIS
    <function _recommendation at ...>
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from mlet_torchrec.experiments.markdown import _mib, _table
from mlet_torchrec.experiments.selection import Results
from mlet_torchrec.experiments.stats import _get, fmt, mean_std, paired_test, verdict


def _compression_section(res: Results, variant: str, comp: list[dict[str, Any]]) -> list[str]:
    """INT8 composition (Fig. 7) and MLET vs SVD (Table 4) from the runs' ``compression`` measurements."""
    L: list[str] = []
    methods = [m for m in res.picks() if m.kind in ("paper", "tuned", "mlet", "mlet_tuned")]
    L += [
        "Table size is relative to a d = 1 FP32 model (paper A.4.4): FP32 d-dim tables are d, INT8 about d/4. "
        "Test AUC, mean ± std over seeds.",
        "",
    ]
    L += ["**INT8 post-training quantization of the collapsed tables** (paper Fig. 7)", ""]
    rows = []
    for m in methods:
        for d in res.ds:
            fp = res.values(m, variant, d, "compression.fp32.auc")
            if not fp:
                continue
            size32 = res.values(m, variant, d, "compression.fp32.table_size")
            size8 = res.values(m, variant, d, "compression.int8 grid.table_size")
            q = [a - b for a, b in zip(res.values(m, variant, d, "compression.int8 grid.auc"), fp, strict=False)]
            rows.append(
                [
                    m.name,
                    d,
                    f"{statistics.fmean(size32):.2f} → {statistics.fmean(size8):.2f}" if size8 else "–",
                    fmt(fp),
                    fmt(res.values(m, variant, d, "compression.int8 maxabs.auc")),
                    fmt(res.values(m, variant, d, "compression.int8 grid.auc")),
                    fmt(q),
                ]
            )
    L += _table(
        ["method", "d", "size FP32 → INT8", "AUC FP32", "AUC INT8 max-abs", "AUC INT8 grid", "Δ AUC (grid − FP32)"],
        rows,
    ) + [""]
    L += [
        "**MLET vs low-rank SVD of the trained single-layer tables** (paper Table 4): the baseline at d is "
        "trained, then every table is replaced by its best rank-r approximation (stored as n·r + r·d); MLET "
        "is trained at d = r directly.",
        "",
    ]
    rows = []
    ref = next((m for m in res.picks() if m.kind == "tuned"), res.picks()[0])
    for d in res.ds:
        for r in sorted({int(k.split()[-1]) for rec in comp for k in rec["compression"] if k.startswith("svd rank")}):
            key = f"compression.svd rank {r}"
            auc = res.values(ref, variant, d, f"{key}.auc")
            if not auc:
                continue
            size = res.values(ref, variant, d, f"{key}.table_size")
            mlet_txt = "–"
            if r in res.ds:
                best = [m for m in res.picks() if m.kind == "mlet_best"] or [m for m in methods if m.kind == "mlet"]
                if best:
                    mv = res.values(best[0], variant, r, "compression.fp32.auc") or res.values(
                        best[0], variant, r, "test.auc"
                    )
                    ms = res.values(best[0], variant, r, "compression.fp32.table_size")
                    mlet_txt = f"{fmt(mv)} (size {statistics.fmean(ms):.2f}, {best[0].name})" if ms else fmt(mv)
            rows.append(
                [
                    f"{ref.name}, d={d}",
                    r,
                    f"{statistics.fmean(size):.2f}",
                    fmt(auc),
                    fmt(res.values(ref, variant, d, "compression.fp32.auc")),
                    mlet_txt,
                ]
            )
    if rows:
        L += _table(
            ["baseline", "SVD rank r", "SVD size", "AUC after SVD", "AUC before (FP32)", "MLET at d = r"], rows
        ) + [""]
    else:
        L += ["no SVD measurements (single-layer runs with d >= 2 needed)", ""]
    if not any(r.get("data_hashing") for r in res.records):
        L += [
            "**Hashing** (paper Fig. 5): see the section 'Hashing, smaller d and INT8' when the results hold "
            "runs on hashed data sets (`mlet compression hash ...`, then a sweep with "
            "`data.path` on the hashed copy).",
            "",
        ]
    return L


def _recommendation(res: Results, variant: str, budgets_mb: Sequence[float]) -> list[str]:
    options = []  # (serving bytes, method, d, mean valid auc, test values)
    for d in res.ds:
        for m in res.picks():
            if m.kind in ("mlet_best", "paper") and any(x.kind == "tuned" for x in res.picks()):
                continue
            if m.kind == "mlet" and res.mlet_tuned:
                continue
            if m.kind == "mlet_best":
                continue
            rs = [r for s in res.seeds if (r := res.pick(m, variant, d, s)) is not None]
            size = _get(rs[0], "serving_table_bytes") if rs else None
            if size is None:
                continue
            va = mean_std([_get(r, "valid.auc") for r in rs])[0]
            options.append((size, m, d, va, [_get(r, "test.auc") for r in rs]))
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
            base_txt = f"{fmt(diffs)} ({verdict(paired_test(diffs))})"
        rows.append(
            [
                _mib(b),
                f"d={best[2]}, "
                + ("k=null (single layer)" if best[1].kind not in ("mlet", "mlet_tuned") else f"k={best[1].k}")
                + f" [{best[1].name}]",
                f"{best[3]:.4f}",
                fmt(best[4]),
                base_txt,
            ]
        )
    lines = [
        "For each serving budget (FP32 tables; every d's size and any `--budget-mb` given), the (d, k) with "
        "the best mean **validation** AUC among the runs whose served tables fit; its test AUC; and, when it "
        "is MLET, its paired test-AUC gain over the tuned baseline at the same d. The served model is d-dim "
        "either way (MLET collapses), so k costs only training memory and time (Table 2). When the gain is "
        "'within noise', train the single-layer baseline with a tuned embedding learning rate instead.",
        "",
    ]
    lines += _table(["budget MiB", "choose", "valid AUC", "test AUC", "Δ vs baseline at same d"], rows) + [""]
    return lines
