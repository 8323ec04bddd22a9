"""Every serving/experiments writer keeps a user's files: foreign files survive, refusals are one line, exit 2.

Per writer (collapse, export, compression's hashed copy, report): ``--overwrite`` on a directory holding a
foreign ``precious.txt`` and ``sub/thesis.tex`` is refused and both stay; an output equal to the input,
containing the input, or the working directory is refused. A SIGKILL in the middle of a collapse (a real
one, in a child process, after the new tables are written and before the output is committed) leaves the
previous output as it was and nothing under the output name; the next collapse clears the dead temporary.
"""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_collapse import fake_run

from mlet_torchrec.cli.main import main
from mlet_torchrec.experiments.hashing import write_hashed_dataset
from mlet_torchrec.experiments.report import render_report
from mlet_torchrec.io import OutputError
from mlet_torchrec.serving.collapse import collapse
from mlet_torchrec.serving.export import export

ROOT = Path(__file__).resolve().parents[1]


def _foreign(directory: Path) -> Path:
    (directory / "sub").mkdir(parents=True)
    (directory / "precious.txt").write_text("mine")
    (directory / "sub" / "thesis.tex").write_text("\\section{mine}")
    return directory


def _intact(directory: Path) -> bool:
    return (directory / "precious.txt").read_text() == "mine" and (
        directory / "sub" / "thesis.tex"
    ).read_text() == "\\section{mine}"


def _refused_in_one_line(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def artifacts(synth_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("writers")
    run = fake_run(root / "run", synth_dataset(), ["embedding.k=16"])
    collapse(run, root / "collapsed", check_split=None)
    return run, root / "collapsed"


def test_collapse_refusals(artifacts, tmp_path, monkeypatch, capsys):
    run, _ = artifacts
    foreign = _foreign(tmp_path / "foreign")
    err = _refused_in_one_line(["collapse", "--input", str(run), "--output", str(foreign), "--overwrite"], capsys)
    assert "did not write" in err and _intact(foreign)
    assert "is the input" in _refused_in_one_line(
        ["collapse", "--input", str(run), "--output", str(run), "--overwrite"], capsys
    )
    assert "contains the input" in _refused_in_one_line(
        ["collapse", "--input", str(run), "--output", str(run.parent), "--overwrite"], capsys
    )
    ckpt = run / "checkpoints" / "step_00000001"
    with pytest.raises(OutputError, match="is the input"):  # the resolved checkpoint counts too
        collapse(run, ckpt, check_split=None, overwrite=True)
    monkeypatch.chdir(tmp_path)
    assert "working directory" in _refused_in_one_line(
        ["collapse", "--input", str(run), "--output", ".", "--overwrite"], capsys
    )
    assert _intact(foreign) and sorted(p.name for p in tmp_path.iterdir()) == ["foreign"]


def test_export_refusals(artifacts, tmp_path, monkeypatch, capsys):
    _, collapsed = artifacts
    foreign = _foreign(tmp_path / "foreign")
    with pytest.raises(OutputError, match="did not write"):
        export(collapsed, foreign, int8=False, formats=("npy",), overwrite=True)
    assert _intact(foreign)
    with pytest.raises(OutputError, match="is the input"):
        export(collapsed, collapsed, int8=False, formats=("npy",), overwrite=True)
    with pytest.raises(OutputError, match="contains the input"):
        export(collapsed, collapsed.parent, int8=False, formats=("npy",), overwrite=True)
    monkeypatch.chdir(tmp_path)
    err = _refused_in_one_line(
        ["export", "--input", str(collapsed), "--output", ".", "--format", "npy", "--no-check", "--overwrite"], capsys
    )
    assert "working directory" in err and (collapsed / "manifest.json").is_file()


def test_hashed_copy_refusals(synth_dataset, tmp_path, monkeypatch):
    data = synth_dataset()
    foreign = _foreign(tmp_path / "foreign")
    with pytest.raises(OutputError, match="did not write"):
        write_hashed_dataset(data, foreign, {"C4": 0.5}, overwrite=True)
    assert _intact(foreign)
    with pytest.raises(OutputError, match="is the input"):
        write_hashed_dataset(data, data, {"C4": 0.5}, overwrite=True)
    with pytest.raises(OutputError, match="contains the input"):
        write_hashed_dataset(data, data.parent, {"C4": 0.5}, overwrite=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match="working directory"):
        write_hashed_dataset(data, ".", {"C4": 0.5}, overwrite=True)
    assert (data / "metadata.json").is_file()


def test_report_adds_files_and_refuses_foreign_reports(tmp_path, monkeypatch):
    """The report writes report.md and plots/ beside its store and notes (docs/results/*): it deletes nothing,
    and replaces only a report.md it wrote."""
    store = ROOT / "docs" / "results" / "movielens" / "results.jsonl"
    out = _foreign(tmp_path / "out")
    (out / "report.md").write_text("my own notes\n")
    with pytest.raises(OutputError, match="did not write"):
        render_report(store, out)
    assert (out / "report.md").read_text() == "my own notes\n"
    (out / "report.md").unlink()
    render_report(store, out)
    render_report(store, out)  # its own report.md is replaced
    assert _intact(out) and (out / "report.md").read_text().startswith("# ")
    assert not [p for p in out.rglob(".*mlet-tmp*")]
    with pytest.raises(OutputError, match="is the input"):
        render_report(store, store)
    monkeypatch.chdir(out)
    with pytest.raises(OutputError, match="working directory"):
        render_report(store, ".")


KILLER = textwrap.dedent("""
    import os, signal, sys
    import mlet_torchrec.serving.collapse as mod

    def killed(*args, **kwargs):  # the new tables are written into the temporary directory: die now
        os.kill(os.getpid(), signal.SIGKILL)

    mod.check_predictions = killed
    mod.collapse(sys.argv[1], sys.argv[2], overwrite=True)
""")


def test_sigkill_in_the_middle_of_a_collapse_keeps_the_old_output(artifacts, tmp_path):
    run, _ = artifacts
    out = tmp_path / "collapsed"
    collapse(run, out, check_split=None)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(run), str(out)], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # the old output, whole; nothing of the new one
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".collapsed.mlet-tmp-")]
    assert len(stale) == 1 and (stale[0] / ".metadata").is_file()  # hidden, beside it, never under it
    collapse(run, out, check_split=None, overwrite=True)  # the next writer clears the dead one's temporary
    assert [p.name for p in tmp_path.iterdir()] == ["collapsed"]
