"""``mlet report`` selections on hand-made results: which run each method picks (tuned learning rate for the
baseline and, with ``mlet sweep --tune``, for MLET at each k) and the hashing section (paper Fig. 5/7)."""

import json
from pathlib import Path
from typing import Any

from mlet_torchrec.experiments.report import render_report
from mlet_torchrec.experiments.selection import Results
from mlet_torchrec.experiments.stats import fmt

HASHING = {"moduli": {"C2": 25}, "original_cardinalities": {"C1": 10, "C2": 100}}


def rec(
    k: int | None, seed: int, lr: float, valid: float, test: float, role: str = "tune", d: int = 4, hashed: bool = False
) -> dict[str, Any]:
    rows = 10 + (25 if hashed else 100)
    size = rows * d / 110  # A.4.4: relative to d = 1, un-hashed (110 rows)
    overrides: dict[str, Any] = {"embedding.d": d, "embedding.k": k, "train.seed": seed}
    if role == "tune":
        overrides["sparse_optimizer.lr"] = lr
    if hashed:
        overrides["data.path"] = "data/hashed"
    return {
        "key": f"{k}-{seed}-{lr}-{d}-{hashed}",
        "status": "ok",
        "role": role,
        "dataset": "toy",
        "overrides": overrides,
        "tune": {"sparse_optimizer.lr": [0.2, 3.2]},
        "budget": "test",
        "d": d,
        "k": k,
        "seed": seed,
        "sparse_lr": lr,
        "dense_lr": 0.2,
        "valid": {"auc": valid},
        "test": {"auc": test, "logloss": 0.5, "rows": 100},
        "serving_table_bytes": rows * d * 4,
        "data_hashing": HASHING if hashed else None,
        "compression": {
            "fp32": {"auc": test, "table_size": size},
            "int8 grid": {"auc": test - 0.001, "table_size": size / 4},
        },
    }


def store(tmp_path: Path, hashed: bool = False) -> Path:
    records = []
    for seed in (0, 1):
        s = 0.01 * seed
        for h in (False, True) if hashed else (False,):
            records += [
                rec(None, seed, 0.2, 0.60 + s, 0.61 + s, "grid", hashed=h),
                rec(None, seed, 3.2, 0.70 + s, 0.71 + s, hashed=h),  # the baseline's tuned pick
                rec(16, seed, 0.2, 0.65 + s, 0.66 + s, "grid", hashed=h),
                rec(16, seed, 3.2, 0.64 + s, 0.80 + s, hashed=h),  # best test, worse valid: never picked
            ]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_every_method_is_tuned_on_validation_only(tmp_path):
    records = [json.loads(line) for line in store(tmp_path).read_text().splitlines()]
    res = Results(records)
    assert res.has_tuning and res.mlet_tuned
    kinds = {m.kind: m for m in res.picks()}
    assert set(kinds) == {"paper", "tuned", "mlet", "mlet_tuned", "mlet_best"}
    picks = {kind: [res.pick(m, "", 4, s)["sparse_lr"] for s in (0, 1)] for kind, m in kinds.items()}
    assert picks == {
        "paper": [0.2, 0.2],
        "tuned": [3.2, 3.2],
        "mlet": [0.2, 0.2],
        "mlet_tuned": [0.2, 0.2],
        "mlet_best": [0.2, 0.2],
    }
    # like with like: MLET at the paper lr against the paper-lr baseline, tuned against tuned
    assert res.paired(kinds["mlet_tuned"], kinds["tuned"], "", 4, "test.auc") == [0.66 - 0.71, 0.67 - 0.72]

    md = render_report(store(tmp_path), tmp_path / "out").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| MLET k=16 (tuned lr) |") and "±" in line)
    assert fmt([0.66, 0.67]) in row
    assert "equal budgets per k" in md
    summary = [line for line in md.splitlines() if line.startswith("| 4 | MLET k=16 (tuned lr) |")]
    assert summary and all("baseline (tuned" in line for line in summary)


def test_hashing_section_compares_hashing_with_smaller_tables(tmp_path):
    md = render_report(store(tmp_path, hashed=True), tmp_path / "out").read_text()
    assert "hashing, smaller d and INT8" in md
    section = md.split("hashing, smaller d and INT8", 1)[1]
    hashed_size, plain_size = 35 * 4 / 110, 110 * 4 / 110
    line = next(x for x in section.splitlines() if x.startswith("| MLET k=16 (tuned lr) | hashed: C2 to 0.25"))
    assert f"| {hashed_size:.2f} |" in line and f"| {hashed_size / 4:.2f} |" in line and fmt([0.66, 0.67]) in line
    line = next(x for x in section.splitlines() if x.startswith("| baseline (tuned lr") and "un-hashed" in x)
    assert f"| {plain_size:.2f} |" in line and fmt([0.71, 0.72]) in line
    assert (tmp_path / "out" / "plots" / "toy_hashing.png").stat().st_size > 1000


def test_diverged_runs_are_listed_and_never_chosen(tmp_path):
    path = store(tmp_path)
    gone = {**rec(16, 0, 51.2, float("nan"), float("nan")), "key": "diverged", "status": "diverged"}
    gone.pop("valid"), gone.pop("test")
    path.write_text(path.read_text() + json.dumps(gone) + "\n")
    md = render_report(path, tmp_path / "out").read_text()
    assert "1 run(s) diverged" in md and "d=4 k=16 lr=51.2" in md
    assert "51.2" not in md.split("1 run(s) diverged")[0]  # no table mentions the diverged lr


def test_a_diverged_top_of_the_grid_counts_as_tried(tmp_path):
    """The baseline's best lr (3.2) is the largest that trained; a larger one that diverged means the grid did
    reach past it, so the report must not ask for a wider grid."""
    path = store(tmp_path)
    assert "Caveat" in render_report(path, tmp_path / "a").read_text()  # 3.2 is the top of what was tried
    gone = {**rec(None, 0, 12.8, 0.0, 0.0), "key": "diverged", "status": "diverged"}
    path.write_text(path.read_text() + json.dumps(gone) + "\n")
    md = render_report(path, tmp_path / "b").read_text()
    assert "Caveat" not in md and "1 run(s) diverged" in md
