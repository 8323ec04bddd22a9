"""``mlet advise``: the verdict of the family reports for any results store, on small constructed stores."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mlet_torchrec.cli.main import main
from mlet_torchrec.errors import UserError
from mlet_torchrec.experiments.advise import advise, format_text, load_store
from mlet_torchrec.experiments.family_tables import LOSS, LR, WIN

PAPER, TUNED = 0.02, 0.08  # the config's learning rate; the one tuning picks
BASE = [0.700, 0.702, 0.698, 0.701, 0.699]  # seed std 0.0016
NOISE = [0.0005, -0.0004, 0.0002, -0.0003, 0.0001]


def rec(d: int, k: int | None, seed: int, lr: float, dense: float, valid: float, test: float, role: str) -> dict:
    """One store line as `mlet sweep` writes it (the fields advise reads)."""
    return {
        "key": f"{d}-{k}-{seed}-{lr}-{dense}",
        "status": "ok",
        "role": role,
        "d": d,
        "k": k,
        "seed": seed,
        "sparse_lr": lr,
        "dense_lr": dense,
        "base_config": "configs/models/deepfm.yaml",
        "grid": {"embedding.d": [4, 8, 16], "embedding.k": [None, 64], "train.seed": [0, 1]},
        "config": {"model": {"name": "deepfm"}, "train": {"epochs": 1}, "embedding": {"sigma": 0.5}},
        "valid": {"auc": valid},
        "test": {"auc": test},
    }


def tuned_runs(d: int, k: int | None, tests: list[float], paper_test: float) -> list[dict]:
    """Every seed: the run at the config's lrs (role grid) and its own tuning grid (3 dense lrs), where (TUNED,
    PAPER) wins on validation, inside the grid. ``tests[s]`` is seed s's tuned test AUC."""
    out = []
    for s, t in enumerate(tests):
        out += [
            rec(d, k, s, PAPER, PAPER, 0.60, paper_test, "grid"),
            rec(d, k, s, TUNED, PAPER, 0.70, t, "tune"),
            rec(d, k, s, TUNED, TUNED, 0.65, 0.5, "tune"),
            rec(d, k, s, TUNED, 4 * TUNED, 0.64, 0.5, "tune"),
            rec(d, k, s, TUNED, PAPER / 4, 0.63, 0.5, "tune"),  # the dense choice (PAPER) is inside too
            rec(d, k, s, 4 * TUNED, PAPER, 0.62, 0.5, "tune"),  # worse: the choice is inside the grid
        ]
    return out


def shifted(delta: float) -> list[float]:
    return [b + delta + n for b, n in zip(BASE, NOISE, strict=True)]


def known_store() -> list[dict]:
    """d=4: MLET wins by 0.01; d=8: it loses by 0.01; d=16: tied when tuned but 0.02 ahead at the config's lr."""
    out: list[dict] = []
    for d in (4, 8, 16):
        out += tuned_runs(d, None, BASE, 0.65)
    out += tuned_runs(4, 16, shifted(0.01), 0.65)
    out += tuned_runs(8, 32, shifted(-0.01), 0.65)
    out += tuned_runs(16, 64, shifted(0.0), 0.67)
    return out


def write(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _mlet(capsys, *argv: str) -> tuple[int, str, list[str]]:
    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = int(e.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err.splitlines()


def test_marks_and_verdict_name_the_win_the_loss_and_the_lr_cell(tmp_path):
    records, _ = load_store(write(tmp_path / "s.jsonl", known_store()))
    a = advise(records, "s.jsonl")
    assert {c.method.d: c.mark for c in a.cells} == {4: WIN, 8: LOSS, 16: LR}
    first = a.verdict[0]
    assert first.startswith("MLET beats the tuned baseline in 1 of 3 cells (deepfm d=4 k=16 σ=0.5)")
    assert "in 1 cell (deepfm d=16 k=64 σ=0.5) tuning the baseline's learning rate does the same" in first
    assert "it loses in 1 cell (deepfm d=8 k=32 σ=0.5)" in first
    assert a.pooled.n_cells == 3 and "Pooled over 3 baseline cluster(s)" in a.verdict[1]
    assert a.verdict[-1].startswith("Reading: mixed")
    assert a.advice == [] and a.command is None  # 5 seeds, both lrs tuned: nothing to add


def test_cli_prints_the_table_and_json(capsys, tmp_path):
    store = write(tmp_path / "s.jsonl", known_store())
    rc, out, err = _mlet(capsys, "advise", "--input", str(store))
    assert rc == 0 and err == []
    rows = [ln for ln in out.splitlines() if ln.startswith("| deepfm")]
    assert len(rows) == 3 and rows[1].split("|")[3].strip() == "8" and rows[1].rstrip(" |").endswith(LOSS)
    assert "To answer this better" not in out
    rc, out, _ = _mlet(capsys, "advise", "--input", str(tmp_path), "--json")  # a directory: its results.jsonl
    assert rc == 2  # tmp_path has s.jsonl, not results.jsonl
    write(tmp_path / "results.jsonl", known_store())
    rc, out, _ = _mlet(capsys, "advise", "--input", str(tmp_path), "--json")
    doc = json.loads(out)
    assert rc == 0 and [c["mark"] for c in doc["cells"]] == [WIN, LOSS, LR]
    assert doc["pooled"]["n_cells"] == 3 and doc["verdict"][0].startswith("MLET beats")
    assert doc["cells"][0]["diff"] == pytest.approx(0.01 + sum(NOISE) / 5)


def test_untuned_store_gets_the_advice_and_the_sweep_flags(tmp_path):
    recs = [rec(4, None, s, PAPER, PAPER, 0.7, b, "grid") for s, b in enumerate(BASE)]
    recs += [rec(4, 16, s, PAPER, PAPER, 0.7, t, "grid") for s, t in enumerate(shifted(0.01))]
    records, path = load_store(write(tmp_path / "s.jsonl", recs))
    a = advise(records, str(path))
    assert any(x.startswith("The baseline ran at one embedding learning rate (0.02), so did MLET") for x in a.advice)
    assert any("dense (and W2) learning rate ran at 1 value(s) (0.02)" in x for x in a.advice)
    assert a.command is not None
    assert '--tune "lr=[0.005,0.02,0.08,0.32] dense_lr=[0.005,0.02,0.08,0.32]" --extend-grid 2' in a.command
    assert "seed=[0,1,2,3,4]" in a.command and "embedding.k=[none,64]" in a.command
    assert a.command.startswith("mlet sweep --config configs/models/deepfm.yaml") and str(path) in a.command
    text = format_text(a)
    assert "To answer this better:" in text and a.command in text
    # the baseline ran at one learning rate: nothing calls it tuned; one baseline has nothing to pool
    assert not a.baseline_tuned and "tuned baseline" not in text.split("To answer")[0], text
    assert "against the single-layer baseline, not tuned" in text and "tune both (below)" in a.verdict[-1]
    assert a.verdict[0].startswith("MLET beats the baseline (one learning rate) in 1 of 1 cells")
    assert a.pooled.n_cells == 1 and not any("Pooled" in line for line in a.verdict)


def test_sweep_command_spells_k_as_a_multiple_of_d_as_the_docs_do(tmp_path):
    recs = [rec(4, None, s, PAPER, PAPER, 0.7, b, "grid") for s, b in enumerate(BASE)]
    recs += [rec(4, 16, s, PAPER, PAPER, 0.7, t, "grid") for s, t in enumerate(shifted(0.01))]
    for r in recs:
        r["grid"] = {"embedding.d": [4], "embedding.k_per_d": [None, 4], "train.seed": [0, 1]}
    records, path = load_store(write(tmp_path / "s.jsonl", recs))
    command = advise(records, str(path)).command
    assert command is not None and "kd=[none,4]" in command and "k_per_d" not in command


def test_one_seed_says_so(tmp_path):
    recs = [rec(4, None, 0, PAPER, PAPER, 0.7, 0.70, "grid"), rec(4, 16, 0, PAPER, PAPER, 0.7, 0.71, "grid")]
    records, path = load_store(write(tmp_path / "s.jsonl", recs))
    a = advise(records, str(path))
    assert a.advice[0].startswith("Fewer than 2 seeds per cell") and "seed=[0,1,2,3,4]" in a.advice[0]
    assert "1 cell (deepfm d=4 k=16 σ=0.5) with fewer than 2 seeds" in a.verdict[0] and a.pooled.n_cells == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("", "no runs in this results store"),
        ("mlet_only", "no finished single-layer run (k null)"),
        ("baseline_only", "no finished MLET run"),
    ],
)
def test_errors_are_one_line_exit_2(capsys, tmp_path, content, message):
    path = tmp_path / "s.jsonl"
    recs = [rec(4, None, 0, PAPER, PAPER, 0.7, 0.7, "grid"), rec(4, 16, 0, PAPER, PAPER, 0.7, 0.7, "grid")]
    if content == "mlet_only":
        write(path, recs[1:])
    elif content == "baseline_only":
        write(path, recs[:1])
    elif content is not None:
        path.write_text(content)
    rc, out, err = _mlet(capsys, "advise", "--input", str(path))
    assert rc == 2 and out == ""
    assert len(err) == 1 and err[0].startswith("mlet advise: error: ") and message in err[0], err
    with pytest.raises(UserError):
        load_store(path)


def test_a_choice_at_the_end_of_the_grid_is_advised(tmp_path):
    records = [r for r in known_store() if r["sparse_lr"] != 4 * TUNED]  # TUNED is now the top of the grid
    a = advise(records, "s.jsonl")
    edge = [x for x in a.advice if "end of the grid" in x]
    assert len(edge) == 1 and "deepfm 1 ep d=4 baseline (highest in 5 of 5 (bound hit))" in edge[0]
    assert "MLET k=16" in edge[0] and "--extend-grid 2" in edge[0]


def test_edge_lists_tell_the_epochs_apart(tmp_path):
    """The same method at 1 and 3 epochs is two methods: each is named once, with its epochs."""
    one = [r for r in known_store() if r["sparse_lr"] != 4 * TUNED]
    three = [{**r, "key": r["key"] + "-3ep", "config": {**r["config"], "train": {"epochs": 3}}} for r in one]
    edge = next(x for x in advise([*one, *three], "s.jsonl").advice if "embedding lr chosen" in x)
    assert edge.count("deepfm 1 ep d=4 baseline (") == 1 and edge.count("deepfm 3 ep d=4 baseline (") == 1, edge


def test_seed_0_choices_for_every_seed_are_advised_as_not_replicated(tmp_path):
    records = [r for r in known_store() if r["seed"] == 0 or r["sparse_lr"] == TUNED and r["dense_lr"] == PAPER]
    for r in records:
        r["role"] = "selected" if r["seed"] else r["role"]
    a = advise(records, "s.jsonl")
    assert any(x.startswith("24 of 30 (method, seed) pairs took another seed's learning rates") for x in a.advice)
    assert "--extend-grid 2" in (a.command or "") and "--tune-seeds" not in (a.command or "")
