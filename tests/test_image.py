"""The built container image, run (`make image-test`; needs `make image` first).

In the image, as uid 1000 with a read-only root file system and only runs/ and data/ mounted
writable: `mlet --help`; synth -> train (configs/tiny.yaml) -> collapse -> evaluate, whose AUC must
equal the same run on the host; a 2-process `torchrun` through the entrypoint's pass-through (what
TorchX starts); TorchX's local_docker scheduler against podman's Docker-compatible socket; no test
tools or compilers in the runtime image; no package index in it.

Every test here is `slow`. Without a container engine or without the image they skip and say why,
and also when the image is older than the sources (it would test old code); MLET_IMAGE_REQUIRED=1
(set by `make image-test`, which rebuilds the image first) turns the first two into failures. MLET_IMAGE picks
the image (default mlet-torchrec:cpu), MLET_IMAGE_ENGINE the engine (podman, or docker with a daemon).
podman reads docker/containers.conf (runc, rlimits, host network: see the comments there).
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("MLET_IMAGE", "mlet-torchrec:cpu")
TEST_IMAGE = os.environ.get("MLET_TEST_IMAGE", IMAGE + "-test")  # the Dockerfile's `test` stage
VENV_BIN = Path(sys.executable).parent
ENV = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(REPO / "docker" / "containers.conf"))}
TINY_DATA = ["rows=8000", "num_sparse=4", "max_cardinality=200", "row_group_size=512"]  # configs/tiny.yaml's data
UID = "1000:1000"

pytestmark = pytest.mark.slow


def _unavailable(reason: str):
    if os.environ.get("MLET_IMAGE_REQUIRED") == "1":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def engine() -> str:
    wanted = os.environ.get("MLET_IMAGE_ENGINE")
    for name in [wanted] if wanted else ["podman", "docker"]:
        if not shutil.which(name):
            continue
        if name == "docker" and subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode:
            continue  # a client without a daemon
        break
    else:
        _unavailable(
            "no container engine to run the image (podman, or docker with a daemon); "
            "apt-get install podman runc, then make image"
        )
    if subprocess.run([name, "image", "inspect", IMAGE], env=ENV, capture_output=True, timeout=120).returncode:
        _unavailable(f"image {IMAGE} not built (make image)")
    if os.environ.get("MLET_IMAGE_REQUIRED") != "1":  # make image-test has just rebuilt it
        newer = _sources_newer_than(name, IMAGE)
        if newer:
            pytest.skip(f"image {IMAGE} is older than {newer} (make image-test rebuilds it and runs these)")
    return name


def _sources_newer_than(engine: str, image: str) -> str:
    """A source file changed after the image was built, or ''. (An old image would test old code.)"""
    fmt = "{{.Created.Unix}}" if engine == "podman" else "{{.Created}}"
    created = subprocess.run(
        [engine, "image", "inspect", "--format", fmt, image],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.strip()
    if not created.isdigit():  # docker: RFC 3339 with nanoseconds
        from datetime import datetime

        created = datetime.fromisoformat(created[:19] + "+00:00").timestamp()
    files = [
        p
        for top in ("mlet_torchrec", "data_pipes", "configs", "docker")
        for p in (REPO / top).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    ]
    files += [REPO / name for name in ("Dockerfile", "pyproject.toml", "requirements.txt", "requirements-torchrec.txt")]
    newest = max(files, key=lambda p: p.stat().st_mtime)
    return str(newest.relative_to(REPO)) if newest.stat().st_mtime > float(created) + 1 else ""


@pytest.fixture(scope="module")
def mounts(tmp_path_factory) -> dict:
    """Host directories for /app/runs and /app/data, writable by the image's uid 1000."""
    root = tmp_path_factory.mktemp("image")
    out = {}
    for name in ("runs", "data"):
        path = root / name
        path.mkdir()
        if os.geteuid() == 0:
            os.chown(path, 1000, 1000)
        else:
            path.chmod(0o777)
        out[name] = path
    return out


def _run(
    engine: str,
    *args: str,
    mounts: dict | None = None,
    user: str = UID,
    timeout: int = 600,
    check: bool = True,
    image: str = IMAGE,
) -> subprocess.CompletedProcess:
    cmd = [engine, "run", "--rm", "--read-only"] + (["--user", user] if user else [])
    for name, path in (mounts or {}).items():
        cmd += ["-v", f"{path}:/app/{name}"]
    proc = subprocess.run(cmd + [image, *args], env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} {image} {' '.join(args)} failed ({proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def _host(*cmd: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"on the host: {' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-5000:]}")
    return proc


def _metrics(stdout: str) -> dict:
    """The JSON object `mlet evaluate` prints (last one in the output)."""
    start = stdout.rindex("\n{") + 1 if "\n{" in stdout else stdout.index("{")
    return json.loads(stdout[start:])


@pytest.fixture(scope="module")
def tiny_data(engine, mounts) -> Path:
    _run(engine, "synth", "--output", "data/tiny", *TINY_DATA, mounts={"data": mounts["data"]})
    return mounts["data"] / "tiny"


def test_runtime_image_runs_as_uid_1000_without_test_tools_or_compilers(engine):
    user = subprocess.run(
        [engine, "image", "inspect", "--format", "{{.Config.User}}", IMAGE],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.strip()
    assert user == UID
    probe = (
        "id -u; for t in pytest ruff hadolint hypothesis gcc cc c++ g++ clang make ld; do "
        "command -v $t >/dev/null && echo FOUND:$t; done; "
        'python -c \'import importlib.util as u; print(*("FOUND:" + m for m in '
        '("pytest", "ruff", "hypothesis", "kubernetes") if u.find_spec(m)))\''
    )
    out = _run(engine, "bash", "-c", probe, user="").stdout  # the image's own USER
    assert out.split()[0] == "1000"
    assert "FOUND:" not in out, out


def test_test_stage_runs_the_static_checks(engine):
    # the `test` stage = runtime + requirements-dev.txt; its own copy of the Dockerfile checks runs in it
    if subprocess.run([engine, "image", "inspect", TEST_IMAGE], env=ENV, capture_output=True, timeout=120).returncode:
        _unavailable(f"test-stage image {TEST_IMAGE} not built (make image-test builds it)")
    out = _run(
        engine, "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_dockerfile.py", image=TEST_IMAGE
    ).stdout
    assert " passed" in out and "failed" not in out, out


def test_no_package_index_in_the_image(engine):
    history = subprocess.run(
        [engine, "history", "--no-trunc", "--format", "{{.CreatedBy}}", IMAGE],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    out = _run(
        engine,
        "bash",
        "-c",
        "ls /run/secrets 2>/dev/null; env | grep -E '^PIP_(INDEX|EXTRA|FIND|CERT)'; "
        "pip config list; cat /etc/pip.conf 2>/dev/null; true",
    ).stdout
    assert "index-url" not in out.lower() and "find-links" not in out.lower() and "pip-index" not in out, out
    for line in history.splitlines():
        assert "index-url=" not in line.lower() and "PIP_INDEX_URL=" not in line, line


def test_help(engine):
    for argv in ([], ["--help"], ["mlet", "--help"]):  # the image's CMD, a flag, and the program by name
        out = _run(engine, *argv).stdout
        assert "usage: mlet" in out and "train" in out and "collapse" in out, (argv, out)


def _input_flag(help_text: str) -> str:
    """`--input`, the current spelling of collapse/evaluate's input, or the older `--checkpoint`."""
    return "--input" if "--input" in help_text else "--checkpoint"


def test_tiny_pipeline_auc_equals_the_hosts(engine, mounts, tiny_data, tmp_path):
    flag = _input_flag(_run(engine, "collapse", "--help").stdout)
    start = time.monotonic()
    for argv in (
        ["train", "--config", "configs/tiny.yaml", "run.dir=runs/tiny"],
        ["collapse", flag, "runs/tiny", "--output", "runs/tiny-collapsed"],
    ):
        _run(engine, *argv, mounts=mounts)
    image = _metrics(_run(engine, "evaluate", flag, "runs/tiny-collapsed", "--json", mounts=mounts).stdout)
    in_image_s = time.monotonic() - start
    assert (mounts["runs"] / "tiny-collapsed" / "manifest.json").is_file()

    # the same run on the host, on the same data
    mlet = str(VENV_BIN / "mlet")
    flag = _input_flag(subprocess.run([mlet, "collapse", "--help"], capture_output=True, text=True, timeout=120).stdout)
    for argv in (
        ["train", "--config", "configs/tiny.yaml", f"data.path={tiny_data}", f"run.dir={tmp_path / 'tiny'}"],
        ["collapse", flag, str(tmp_path / "tiny"), "--output", str(tmp_path / "collapsed")],
    ):
        _host(mlet, *argv)
    host = _metrics(_host(mlet, "evaluate", flag, str(tmp_path / "collapsed"), "--json").stdout)
    print(
        f"\nAUC in the image {image['auc']!r}, on the host {host['auc']!r}; LogLoss {image['logloss']!r} vs "
        f"{host['logloss']!r} (image train+collapse+evaluate {in_image_s:.0f} s)"
    )
    assert image["rows"] == host["rows"] == 800
    assert image["auc"] == pytest.approx(host["auc"], abs=1e-6)
    assert image["logloss"] == pytest.approx(host["logloss"], abs=1e-6)


def test_two_process_torchrun_pass_through(engine, mounts, tiny_data):
    # what TorchX's local_docker starts: the entrypoint runs `bash -c "torchrun ..."` as given
    cmd = (
        "torchrun --standalone --nnodes 1 --nproc-per-node 2 -m mlet_torchrec.cli "
        "train --config configs/tiny.yaml run.dir=runs/tiny-2ranks"
    )
    _run(engine, "bash", "-c", cmd, mounts=mounts)
    metrics = json.loads((mounts["runs"] / "tiny-2ranks" / "metrics.json").read_text())
    assert metrics, metrics


def test_clear_error_without_a_writable_mount(engine):
    for argv in (
        ["synth", "--output", "data/tiny", *TINY_DATA],
        ["train", "--config", "configs/tiny.yaml", "run.dir=runs/x"],
    ):
        proc = _run(engine, *argv, check=False)  # nothing mounted: /app is on the read-only root
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mlet-entrypoint: cannot write /app/"), proc.stderr
        assert "mount a writable directory" in lines[0]


@pytest.fixture
def docker_socket(engine, tmp_path):
    """DOCKER_HOST for TorchX: podman's Docker-compatible API service, stopped afterwards."""
    if engine == "docker":
        yield os.environ.get("DOCKER_HOST", "")
        return
    sock = Path("/tmp") / f"mlet-podman-{os.getpid()}.sock"  # short path: unix socket names are limited
    with open(tmp_path / "service.log", "w") as log:
        service = subprocess.Popen(
            ["podman", "system", "service", "--time=0", f"unix://{sock}"],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"podman system service did not create {sock}: {(tmp_path / 'service.log').read_text()}")
        yield f"unix://{sock}"
    finally:
        service.terminate()
        try:
            service.wait(timeout=30)
        except subprocess.TimeoutExpired:
            service.kill()
        sock.unlink(missing_ok=True)


def test_torchx_local_docker_through_podman(engine, mounts, tiny_data, docker_socket):
    env = {
        **ENV,
        "DOCKER_HOST": docker_socket,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
        "TORCHXCONFIG": str(REPO / ".torchxconfig"),
        "LOGLEVEL": "WARNING",
    }
    mount_arg = f"type=bind,src={mounts['runs']},dst=/app/runs,type=bind,src={mounts['data']},dst=/app/data,readonly"
    cmd = [
        str(VENV_BIN / "torchx"),
        "run",
        "-s",
        "local_docker",
        "--workspace",
        "",
        "launch/components.py:train",
        "--image",
        IMAGE,
        "--mounts",
        mount_arg,
        "--config",
        "configs/tiny.yaml",
        "-j",
        "1x2",
        "run.dir=runs/tiny-torchx",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    handles = [w for w in proc.stdout.split() if w.startswith("local_docker://")]
    for handle in handles:  # local_docker keeps exited containers: remove this job's
        app_id = handle.rsplit("/", 1)[-1]
        ids = subprocess.run(
            [engine, "ps", "-aq", "--filter", f"label=torchx.pytorch.org/app-id={app_id}"],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.split()
        if ids:
            subprocess.run([engine, "rm", "-f", *ids], env=ENV, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert (mounts["runs"] / "tiny-torchx" / "metrics.json").is_file()
