"""The ``mlet`` command line: one vocabulary, old spellings that warn once, and errors a user can read.

A user's mistake ends in one ``mlet CMD: error: ...`` line and exit 2; a bug keeps its traceback (exit 1).
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mlet_torchrec.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
CRITEO = ["convert", "criteo", "--input", str(ROOT / "README.md"), "--output", "o"]  # fails before reading
COMMANDS = sorted(next(a for a in build_parser()._actions if a.dest == "command").choices)


def _mlet(capsys, *argv: str) -> tuple:
    """(exit status, stdout, stderr lines) of ``mlet ARGV`` run in this process."""
    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse's own errors (bad flag, missing flag) and --help
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err.splitlines()


def _one_error_line(err: list, command: str) -> str:
    assert len(err) == 1 and err[0].startswith(f"mlet {command}: error: "), err
    return err[0]


# ----------------------------------------------------------------------------------- help


def test_top_level_help_lists_every_subcommand_with_a_summary(capsys):
    assert {"train", "collapse", "export", "evaluate", "synth", "demo", "sweep", "report", "convert"} <= set(COMMANDS)
    rc, out, _ = _mlet(capsys, "--help")
    assert rc == 0
    for command in COMMANDS:
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(command + " "))
        assert len(line.split()) > 2, line  # the name and a one-line summary
    assert "--log-level" in out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_help_has_an_example_and_the_common_flags(capsys, command):
    rc, out, _ = _mlet(capsys, command, "--help")
    assert rc == 0
    assert "example:" in out and f"mlet {command}" in out.split("example:")[1]
    assert "--log-level" in out


def test_vocabulary_flags_per_subcommand():
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    expected = {
        "train": {"--config", "--input", "--output", "--seed", "--nproc-per-node"},
        "collapse": {"--input", "--output", "--overwrite", "--nproc-per-node"},
        "export": {"--input", "--output", "--overwrite"},
        "evaluate": {"--input"},
        "synth": {"--config", "--output", "--overwrite", "--seed"},
        "demo": {"--output", "--seed", "--nproc-per-node"},
        "sweep": {"--config", "--output", "--nproc-per-node"},
        "report": {"--input", "--output"},
    }
    for command, wanted in expected.items():
        have = {s for a in sub[command]._actions for s in a.option_strings}
        assert wanted | {"--log-level"} <= have, (command, wanted - have)


# ----------------------------------------------------------------------------------- one spelling per flag


@pytest.mark.parametrize(
    "argv, old",
    [
        (["collapse", "--input", "X", "--output", "O", "--checkpoint", "X"], "--checkpoint"),
        (["evaluate", "--input", "X", "--checkpoint", "X"], "--checkpoint"),
        (["export", "--input", "X", "--output", "O", "--collapsed", "X"], "--collapsed"),
        (["report", "--input", "r.jsonl", "--out", "O"], "--out"),
        (["sweep", "--grid", "d=[4]", "--output", "R", "--nproc", "3"], "--nproc"),
        (["demo", "--workdir", "W"], "--workdir"),
        (["train", "--verbose"], "--verbose"),
        (["report", "--input", "r.jsonl", "--output", "O", "--", "s.jsonl"], "s.jsonl"),
    ],
)
def test_old_spellings_and_abbreviations_are_unknown(capsys, argv, old):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(err) == 1 and old in err[0], err


def test_new_spellings_do_not_warn(capsys):
    build_parser().parse_args(["collapse", "--input", "X", "--output", "O", "--log-level", "debug"])
    build_parser().parse_args(
        ["--log-level", "WARNING", "sweep", "--grid", "d=[4]", "--output", "R", "--nproc-per-node", "1"]
    )
    assert capsys.readouterr().err == ""


def test_log_level_before_or_after_the_subcommand():
    assert build_parser().parse_args(["--log-level", "debug", "evaluate", "--input", "X"]).log_level == "DEBUG"
    assert build_parser().parse_args(["evaluate", "--input", "X", "--log-level", "error"]).log_level == "ERROR"
    assert not hasattr(build_parser().parse_args(["evaluate", "--input", "X"]), "log_level")  # INFO by default


# ----------------------------------------------------------------------------------- user errors: one line, exit 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--config", "no/such.yaml"], "config file no/such.yaml does not exist"),
        (["train", "--config", "tiny", "train.trian=1"], "train.trian: unknown key"),
        (["train", "--config", "tiny", "train.batch_size=many"], "train.batch_size: Input should be a valid integer"),
        (["train", "--config", "tiny", "nonsense"], "override 'nonsense' is not of the form key.sub=value"),
        (["train", "--config", "tiny", "model.top_mlp=[1,"], "override 'model.top_mlp=[1,': value is not valid YAML"),
        (["collapse", "--input", "no/run", "--output", "o"], "--input no/run does not exist"),
        (["export", "--input", "no/run", "--output", "o", "--int8"], "--input no/run does not exist"),
        (["export", "--input", ".", "--output", "o", "--shards", "2"], "--shards shards the INT8 model: add --int8"),
        (["evaluate", "--input", "no/run"], "--input no/run does not exist"),
        (["collapse", "--output", "o"], "the following arguments are required: --input"),
        (
            ["synth", "--output", "o", "rows=many"],
            "invalid config (synth settings): rows: Input should be a valid integer",
        ),
        (["synth", "--output", "o", "--config", "no/such.yaml"], "config file no/such.yaml does not exist"),
        (
            ["sweep", "--grid", "d=[4]", "--output", "r.jsonl", "--tune", "lr=[1]", "--tune-baseline", "lr=[1]"],
            "give --tune (every method) or --tune-baseline",
        ),
        (["sweep", "--config", "no/such.yaml", "--grid", "d=[4]", "--output", "r.jsonl"], "does not exist"),
        (
            ["sweep", "--grid", "d=[4]", "--output", "r.jsonl", "--in-process", "--nproc-per-node", "2"],
            "--in-process needs --nproc-per-node 1",
        ),
        (["train", "--config", "tiny", "--nproc-per-node", "0"], "--nproc-per-node: invalid positive integer: '0'"),
        (["collapse", "--input", "x", "--output", "o", "--tolerance", "-1"], "--tolerance: invalid non-negative"),
        (["export", "--input", "x", "--output", "o", "--max-check-rows", "0"], "--max-check-rows: invalid positive"),
        (["sweep", "--grid", "d=[4]", "--output", "r.jsonl", "--parallel", "0"], "--parallel: invalid positive"),
        (["sweep", "--grid", "d=[4]", "--output", "r.jsonl", "--extend-grid", "-1"], "--extend-grid: invalid non-neg"),
        (
            ["train", "--config", "tiny", "model.bottom_mlp=[0]"],
            "model: model.bottom_mlp: layer sizes must be positive",
        ),
        (
            ["convert", "criteo", "--input", "README.md", "--output", "o", "--split", "0", "0", "1"],
            "--split: fractions",
        ),
        (
            ["convert", "criteo", "--input", "README.md", "--output", "o", "--min-count", "0"],
            "--min-count must be >= 1",
        ),
        (
            [
                "convert",
                "criteo",
                "--input",
                "README.md",
                "--test",
                "README.md",
                "--output",
                "o",
                "--split",
                "1",
                "0",
                "0",
            ],
            "--split applies to a single input",
        ),
    ],
)
def test_user_errors_are_one_line_exit_2(capsys, argv, message):
    rc, out, err = _mlet(capsys, *argv)
    assert rc == 2 and out == ""
    assert message in _one_error_line(err, argv[0])


def test_yaml_syntax_error_and_bad_value_in_a_file(capsys, tmp_path):
    (tmp_path / "broken.yaml").write_text("data: {path: [\n  x\n")
    rc, _, err = _mlet(capsys, "train", "--config", str(tmp_path / "broken.yaml"))
    assert rc == 2 and "is not valid YAML" in _one_error_line(err, "train")
    (tmp_path / "bad.yaml").write_text("embedding:\n  d: 4\n  k: 2\ntrain:\n  nope: 1\n")
    rc, _, err = _mlet(capsys, "train", "--config", str(tmp_path / "bad.yaml"))
    line = _one_error_line(err, "train")
    assert rc == 2 and "train.nope: unknown key" in line and str(tmp_path / "bad.yaml") in line


def test_missing_data_set_is_a_user_error(capsys, tmp_path):
    rc, _, err = _mlet(
        capsys, "train", "--config", "tiny", "--input", str(tmp_path / "nodata"), "--output", str(tmp_path / "run")
    )
    assert rc == 2 and "no metadata.json" in _one_error_line(err, "train")


def test_bad_flags_exit_2_through_argparse_in_one_line(capsys):
    rc, _, err = _mlet(capsys, "train", "--no-such-flag")
    assert rc == 2 and err == ["mlet: error: unrecognized arguments: --no-such-flag (see mlet --help)"]
    rc, _, err = _mlet(capsys, "collapse", "--input", "x", "--output", "o", "--nproc-per-node", "two")
    assert rc == 2 and "invalid positive integer: 'two'" in _one_error_line(err, "collapse")
    rc, _, err = _mlet(capsys, "--log-level", "chatty", "train")
    assert rc == 2 and len(err) == 1 and "invalid choice: 'CHATTY'" in err[0]
    rc, _, err = _mlet(capsys, "convert", "avazu", "--output", "o")
    assert rc == 2 and "required: --input" in _one_error_line(err, "convert avazu")


def test_convert_missing_input(capsys, tmp_path):
    rc, _, err = _mlet(
        capsys, "convert", "criteo", "--input", str(tmp_path / "none.tsv"), "--output", str(tmp_path / "out")
    )
    assert rc == 2 and _one_error_line(err, "convert").endswith(f"--input {tmp_path / 'none.tsv'} does not exist")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------- processes: traceback or not


def test_user_error_has_no_traceback_and_a_bug_keeps_it(tmp_path):
    user = subprocess.run(
        [sys.executable, "-m", "mlet_torchrec.cli", "train", "--config", "tiny", "train.nope=1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert user.returncode == 2 and user.stdout == ""
    assert user.stderr.splitlines() == [
        "mlet train: error: invalid config (packaged config tiny with overrides train.nope=1): train.nope: unknown key"
    ]
    # a bug (here: the generator raising an internal error) is not a user error: traceback, exit 1
    bug = textwrap.dedent("""
        import sys
        import data_pipes.synth

        def generate(*args, **kwargs):
            raise RuntimeError("internal: shapes disagree")

        data_pipes.synth.generate = generate
        from mlet_torchrec.cli.main import main
        sys.exit(main(["synth", "--output", "out", "rows=100"]))
    """)
    crash = subprocess.run(
        [sys.executable, "-c", bug], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert crash.returncode == 1
    assert "Traceback (most recent call last)" in crash.stderr
    assert crash.stderr.strip().endswith("RuntimeError: internal: shapes disagree")


@pytest.mark.slow
def test_user_error_in_local_workers_is_one_line(tmp_path):
    # the data set is read by the 2 spawned workers, not by the parent: their UserError still ends as one line
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlet_torchrec.cli",
            "train",
            "--config",
            "tiny",
            "--nproc-per-node",
            "2",
            "--input",
            "nodata",
            "--output",
            "run",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "mlet train: error: nodata/metadata.json: no metadata.json; is nodata a converted data set?"
    ]
