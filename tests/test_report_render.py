"""The committed reports re-render byte-for-byte from their stores, so a refactor cannot silently change results.

Each docs/results/<name>/ holds a results store and the report rendered from it with the command in its
COMMANDS.md (``mlet report docs/results/<name>/results.jsonl --out docs/results/<name>``). The store and the
notes are copied to the same relative place under a temporary working directory, rendered there with that
command's arguments, and the new report.md must equal the committed one; the plots must be the same files.
"""

import shutil
from pathlib import Path

import pytest

from mlet_torchrec.experiments.report import render_report

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ["synth1m", "movielens", "criteo_sample"]


@pytest.mark.parametrize("name", REPORTS)
def test_committed_report_rerenders_byte_for_byte(name, tmp_path, monkeypatch):
    rel = Path("docs/results") / name
    committed = ROOT / rel
    (tmp_path / rel).mkdir(parents=True)
    for f in ("results.jsonl", "COMMANDS.md"):
        shutil.copy(committed / f, tmp_path / rel / f)
    monkeypatch.chdir(tmp_path)  # the report names its command with the paths as given
    out = render_report(str(rel / "results.jsonl"), str(rel))
    assert out.read_bytes() == (committed / "report.md").read_bytes()
    assert sorted(p.name for p in (tmp_path / rel / "plots").iterdir()) == sorted(
        p.name for p in (committed / "plots").iterdir()
    )


FAMILIES_DIR = Path("docs/results/families")


@pytest.mark.skipif(
    not (ROOT / FAMILIES_DIR / "README.md").exists(), reason="docs/results/families is not rendered in this checkout"
)
def test_committed_family_reports_rerender_byte_for_byte(tmp_path, monkeypatch):
    from mlet_torchrec.experiments.family_report import render_families

    committed = ROOT / FAMILIES_DIR
    for store in committed.glob("*/results.jsonl"):
        dest = tmp_path / FAMILIES_DIR / store.parent.name
        dest.mkdir(parents=True)
        shutil.copy(store, dest / "results.jsonl")
    shutil.copytree(ROOT / "configs", tmp_path / "configs")  # the sweeps' base configs give the expected cells
    monkeypatch.chdir(tmp_path)
    written = render_families(str(FAMILIES_DIR))
    assert written
    for path in written:
        assert path.read_bytes() == (ROOT / path).read_bytes(), path
    rendered = sorted(p.name for p in (tmp_path / FAMILIES_DIR / "plots").iterdir())
    assert rendered == sorted(p.name for p in (committed / "plots").iterdir())
    for name in rendered:
        assert (tmp_path / FAMILIES_DIR / "plots" / name).read_bytes() == (committed / "plots" / name).read_bytes()
