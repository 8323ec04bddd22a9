"""TorchX components of launch/: their AppDefs, `torchx run --dryrun` on kubernetes/slurm/local_docker
(no cluster or Docker engine needed), .torchxconfig, and a real 2-process run through local_cwd."""

import configparser
import importlib.util
import inspect
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPONENTS = "launch/components.py"
VENV_BIN = str(Path(sys.executable).parent)

sys.path.insert(0, str(REPO))
from torchx.runner import get_runner  # noqa: E402
from torchx.runner.config import load_sections  # noqa: E402
from torchx.schedulers import get_scheduler_factories  # noqa: E402
from torchx.specs.file_linter import validate  # noqa: E402
from torchx.specs.finder import ComponentValidationException  # noqa: E402

from launch import components  # noqa: E402

HAS_KUBERNETES = importlib.util.find_spec("kubernetes") is not None
NEEDS_KUBERNETES = pytest.mark.skipif(
    not HAS_KUBERNETES,
    reason="the kubernetes client package renders TorchX's kubernetes dryrun "
    "(kubernetes==25.3.0 in requirements-dev.txt)",
)

# A 2-node x 4-GPU job as one would launch it on a cluster.
JOB = [
    "-j",
    "2x4",
    "--gpu",
    "4",
    "--cpu",
    "16",
    "--memMB",
    "64000",
    "--image",
    "registry.example.com/mlet-torchrec:cuda",
    "--max_retries",
    "3",
    "--max_restarts",
    "2",
    "--env",
    "NCCL_DEBUG=INFO",
]
TRAIN_ARGS = ["--config", "configs/tiny.yaml", "run.dir=/mnt/runs/x", "train.epochs=2"]
MLET_CMD = "-m mlet_torchrec.cli train --config configs/tiny.yaml run.dir=/mnt/runs/x train.epochs=2"


def _env() -> dict:
    # torchx's replicas find torchrun on PATH: put this interpreter's venv first. TORCHXCONFIG pins
    # the repo's .torchxconfig (what the CLI finds in the repo root) and keeps a $HOME one out.
    return {
        **os.environ,
        "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", ""),
        "LOGLEVEL": "WARNING",
        "TORCHXCONFIG": str(REPO / ".torchxconfig"),
    }


def _torchx(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [os.path.join(VENV_BIN, "torchx"), *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(f"torchx {shlex.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _dryrun(scheduler: str, component: str, *args: str, cfg: str = "") -> str:
    """The scheduler request that `torchx run --dryrun` prints (workspace off: use the image as is)."""
    cli = ["run", "--workspace", "", "--dryrun", "-s", scheduler] + (["-cfg", cfg] if cfg else [])
    out = _torchx(*cli, f"{COMPONENTS}:{component}", *args).stdout
    assert "=== SCHEDULER REQUEST ===" in out, out
    return out.split("=== SCHEDULER REQUEST ===", 1)[1]


# ---------------------------------------------------------------- the components themselves


@pytest.mark.parametrize("name", ["train", "collapse", "evaluate", "predict", "convert"])
def test_components_pass_torchx_linter(name):
    assert validate(str(REPO / COMPONENTS), name) == []


def test_train_appdef():
    app = components.train(
        "configs/tiny.yaml",
        "run.dir=/mnt/runs/x",
        j="2x4",
        gpu=4,
        cpu=16,
        memMB=64000,
        image="img:1",
        max_retries=3,
        max_restarts=2,
        env={"A": "1"},
    )
    (role,) = app.roles
    assert app.name == "mlet-train" and role.name == "train"
    assert role.num_replicas == 2 and role.min_replicas == 2
    assert (role.resource.cpu, role.resource.gpu, role.resource.memMB) == (16, 4, 64000)
    assert role.image == "img:1" and role.max_retries == 3 and role.env["A"] == "1"
    assert role.entrypoint == "bash" and role.args[0] == "-c"
    cmd = shlex.split(role.args[1])
    assert cmd[:3] == ["torchrun", "--max-restarts", "2"]
    assert cmd[cmd.index("--nnodes") + 1] == "2" and cmd[cmd.index("--nproc_per_node") + 1] == "4"
    assert cmd[cmd.index("-m") :] == [
        "-m",
        "mlet_torchrec.cli",
        "train",
        "--config",
        "configs/tiny.yaml",
        "run.dir=/mnt/runs/x",
    ]


def test_train_defaults_are_a_local_two_process_cpu_job():
    (role,) = components.train("c.yaml").roles
    cmd = shlex.split(role.args[1])
    assert role.num_replicas == 1 and cmd[cmd.index("--nproc_per_node") + 1] == "2"
    assert role.resource.gpu == 0 and role.max_retries == 0 and "--max-restarts" not in cmd
    assert role.image == components.DEFAULT_IMAGE


def test_train_rejects_more_processes_than_gpus():
    # a ComponentValidationException: `torchx run` prints its message in one line instead of a traceback
    with pytest.raises(ComponentValidationException, match="only 4 GPUs"):
        components.train("c.yaml", j="1x8", gpu=4)
    with pytest.raises(ComponentValidationException, match="max_restarts"):
        components.train("c.yaml", max_restarts=-1)


def _mlet_args(role) -> list:
    cmd = shlex.split(role.args[1])
    return cmd[cmd.index("mlet_torchrec.cli") + 1 :]


def test_collapse_and_evaluate_default_to_one_process():
    (c,) = components.collapse("runs/a", "runs/a/collapsed", overwrite=True, max_retries=1).roles
    (e,) = components.evaluate("runs/a/collapsed", split="valid", gpu=1).roles
    for role in (c, e):
        cmd = shlex.split(role.args[1])
        assert role.num_replicas == 1 and cmd[cmd.index("--nproc_per_node") + 1] == "1"
    assert _mlet_args(c) == [
        "collapse",
        "--input",
        "runs/a",
        "--output",
        "runs/a/collapsed",
        "--check-split",
        "test",
        "--overwrite",
    ]
    assert c.max_retries == 1 and c.name == "collapse"
    assert _mlet_args(e) == ["evaluate", "--input", "runs/a/collapsed", "--split", "valid", "--auc", "histogram"]
    assert e.resource.gpu == 1 and e.name == "evaluate"


def test_collapse_and_evaluate_take_j_like_train():
    (c,) = components.collapse("runs/a", "runs/a/collapsed", j="2x4", gpu=4).roles
    (e,) = components.evaluate("runs/a/collapsed", auc="exact", j="1x3").roles
    for role, nodes, procs in ((c, 2, "4"), (e, 1, "3")):
        cmd = shlex.split(role.args[1])
        assert role.num_replicas == nodes and cmd[cmd.index("--nproc_per_node") + 1] == procs
    assert _mlet_args(e)[-2:] == ["--auc", "exact"]
    for component in (components.collapse, components.evaluate):
        with pytest.raises(ValueError, match="GPUs"):
            component("runs/a", *(["runs/b"] if component is components.collapse else []), j="1x8", gpu=4)


def test_predict_takes_j_and_the_cli_flags():
    (p,) = components.predict("runs/a/export", "/mnt/p.parquet", j="2x3").roles
    cmd = shlex.split(p.args[1])
    assert p.num_replicas == 2 and cmd[cmd.index("--nproc_per_node") + 1] == "3" and p.name == "predict"
    assert _mlet_args(p) == ["predict", "--input", "runs/a/export", "--output", "/mnt/p.parquet", "--split", "test"]
    (q,) = components.predict("r", "o.parquet", data="d", split="valid", precision="fp32", overwrite=True).roles
    assert _mlet_args(q)[5:] == ["--split", "valid", "--data", "d", "--precision", "fp32", "--overwrite"]


def test_convert_runs_the_mlet_convert_command_line_on_every_rank():
    args = ["criteo", "--input", "/mnt/criteo_1tb", "--output", "/mnt/data/c1tb", "--hash-buckets", "40000000"]
    (c,) = components.convert(*args, j="4x16", cpu=16, max_retries=2, max_restarts=1).roles
    cmd = shlex.split(c.args[1])
    assert c.num_replicas == 4 and cmd[cmd.index("--nproc_per_node") + 1] == "16" and c.name == "convert"
    assert cmd[cmd.index("--max-restarts") + 1] == "1" and c.max_retries == 2 and c.resource.gpu == 0
    assert _mlet_args(c) == ["convert", *args]
    with pytest.raises(ComponentValidationException, match="mlet convert command line last"):
        components.convert("--input", "x")


def test_evaluate_dryrun_runs_torchrun_with_j():
    script = _dryrun("slurm", "evaluate", "--input", "/mnt/runs/x", "-j", "2x3", "--auc", "exact")
    srun = [line for line in script.splitlines() if "bash -c" in line]
    assert len(srun) == 2
    for line in srun:
        assert "--nnodes 2 --nproc_per_node 3" in line
        assert "-m mlet_torchrec.cli evaluate --input /mnt/runs/x --split test --auc exact" in line


def test_component_commands_parse_with_the_mlet_cli(capsys):
    import argparse

    from mlet_torchrec.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for app in (
        components.train("configs/tiny.yaml", "run.dir=/x"),
        components.collapse("runs/a", "runs/b", check_split="none", overwrite=True),
        components.evaluate("runs/a", split="valid"),
        components.predict("runs/a/export", "p.parquet", data="data/new", precision="fp32", overwrite=True),
        components.convert("criteo", "--input", "days", "--output", "data/c", "--min-count", "2", "--lenient"),
    ):
        args = parser.parse_args(_mlet_args(app.roles[0]))
        assert args.command in sub.choices and args.command == app.roles[0].name
    assert "deprecated" not in capsys.readouterr().err  # the components speak the current flag vocabulary


# ---------------------------------------------------------------- --dryrun per scheduler


@NEEDS_KUBERNETES
def test_kubernetes_dryrun():
    job = yaml.safe_load(_dryrun("kubernetes", "train", *JOB, *TRAIN_ARGS, cfg="queue=research"))
    assert job["kind"] == "Job" and job["apiVersion"].startswith("batch.volcano.sh/")
    assert job["spec"]["queue"] == "research" and job["spec"]["maxRetry"] == 3
    tasks = job["spec"]["tasks"]
    assert [t["name"] for t in tasks] == ["train-0", "train-1"] and all(t["replicas"] == 1 for t in tasks)
    for task in tasks:
        assert task["maxRetry"] == 3
        (container,) = task["template"]["spec"]["containers"]
        assert container["image"] == "registry.example.com/mlet-torchrec:cuda"
        limits = container["resources"]["limits"]
        assert limits == {"cpu": "16000m", "memory": "64000M", "nvidia.com/gpu": "4"}
        assert container["resources"]["requests"]["nvidia.com/gpu"] == "4"
        assert container["command"][:2] == ["bash", "-c"]
        cmd = container["command"][2]
        assert cmd.startswith("torchrun --max-restarts 2 ") and "--nnodes 2 --nproc_per_node 4" in cmd
        assert cmd.endswith(MLET_CMD)
        assert {"name": "NCCL_DEBUG", "value": "INFO"} in container["env"]
    # replica 1 finds the rendezvous on replica 0 through Volcano's host list
    assert "${VC_TRAIN_0_HOSTS:=localhost}:29500" in tasks[1]["template"]["spec"]["containers"][0]["command"][2]


@NEEDS_KUBERNETES
def test_kubernetes_dryrun_uses_torchxconfig_queue_and_image():
    job = yaml.safe_load(_dryrun("kubernetes", "evaluate", "--input", "/mnt/runs/x"))
    assert job["spec"]["queue"] == "default"  # from .torchxconfig
    (task,) = job["spec"]["tasks"]
    (container,) = task["template"]["spec"]["containers"]
    assert container["image"] == "mlet-torchrec:cpu"  # [component:launch/components.py:evaluate]
    assert container["command"][2].endswith(
        "-m mlet_torchrec.cli evaluate --input /mnt/runs/x --split test --auc histogram"
    )
    assert "nvidia.com/gpu" not in container["resources"]["limits"]


@NEEDS_KUBERNETES
def test_convert_kubernetes_dryrun_for_criteo_1tb():
    """The README's command: 4 nodes x 6 ranks over the 24 day files on a shared volume, resubmitted on failure."""
    job = yaml.safe_load(
        _dryrun(
            "kubernetes",
            "convert",
            *["--image", "REGISTRY/mlet-torchrec:cpu", "-j", "4x6", "--cpu", "8", "--memMB", "32000"],
            *["--max_retries", "2", "--mounts", "type=volume,src=mlet-data,dst=/app/data"],
            *["criteo", "--input", "/app/data/criteo_1tb", "--output", "/app/data/criteo1tb", "--hash-buckets", "4000"],
        )
    )
    tasks = job["spec"]["tasks"]
    assert [t["name"] for t in tasks] == [f"convert-{i}" for i in range(4)] and job["spec"]["maxRetry"] == 2
    for task in tasks:
        (container,) = task["template"]["spec"]["containers"]
        assert "--nnodes 4 --nproc_per_node 6" in container["command"][2]
        assert container["command"][2].endswith(
            "-m mlet_torchrec.cli convert criteo --input /app/data/criteo_1tb --output /app/data/criteo1tb "
            "--hash-buckets 4000"
        )
        assert container["volumeMounts"][-1]["mountPath"] == "/app/data"
        assert task["template"]["spec"]["volumes"][-1]["persistentVolumeClaim"]["claimName"] == "mlet-data"


def test_slurm_dryrun():
    script = _dryrun("slurm", "train", *JOB, *TRAIN_ARGS, cfg="partition=gpu,time=4:00:00")
    groups = re.findall(r"^#SBATCH (--job-name=.*)$", script, re.M)
    assert len(groups) == 2, script  # one heterogeneous group per node
    for i, line in enumerate(groups):
        opts = line.split()
        assert opts[0] == f"--job-name=train-{i}"
        for opt in (
            "--requeue",
            "--partition=gpu",
            "--time=4:00:00",
            "--ntasks-per-node=1",
            "--cpus-per-task=16",
            "--mem=64000",
            "--gpus-per-task=4",
        ):
            assert opt in opts, (opt, line)
    assert "export TORCHX_MAX_RETRIES=3" in script and "scontrol requeue" in script
    srun = [line for line in script.splitlines() if "bash -c" in line]
    assert len(srun) == 2
    for line in srun:
        assert "torchrun --max-restarts 2 " in line and "--nnodes 2 --nproc_per_node 4" in line
        assert "${SLURM_JOB_NODELIST_HET_GROUP_0:=localhost}:29500" in line
        assert line.rstrip(" :\\").endswith(MLET_CMD + "'")
        assert "NCCL_DEBUG=INFO" in line


def test_local_docker_dryrun_cli():
    out = _dryrun("local_docker", "train", *JOB, *TRAIN_ARGS)
    assert out.count("image: registry.example.com/mlet-torchrec:cuda") == 2
    assert "MaximumRetryCount: 3" in out and "mem_limit: 64000m" in out


def test_local_docker_dryrun_request():
    app = components.train(
        "configs/tiny.yaml",
        "run.dir=/app/runs/x",
        j="2x2",
        gpu=2,
        cpu=4,
        memMB=8000,
        image="mlet-torchrec:cuda",
        max_retries=1,
        mounts=["type=bind", "src=/srv/runs", "dst=/app/runs"],
    )
    with get_runner() as runner:
        info = runner.dryrun(app, "local_docker", cfg={}, workspace=None)
    containers = info.request.containers
    assert len(containers) == 2
    for c in containers:
        assert c.image == "mlet-torchrec:cuda"
        # the image's entrypoint gets these as arguments and runs them (docker/entrypoint.sh)
        assert c.command[:2] == ["bash", "-c"] and c.command[2].endswith(
            "-m mlet_torchrec.cli train --config configs/tiny.yaml run.dir=/app/runs/x"
        )
        kw = c.kwargs
        assert kw["mem_limit"] == "8000m" and kw["nano_cpus"] == 4 * 10**9
        assert kw["restart_policy"] == {"Name": "on-failure", "MaximumRetryCount": 1}
        (req,) = kw["device_requests"]
        assert req["Count"] == 2 and "compute" in req["Capabilities"][0]
        (mount,) = kw["mounts"]
        assert mount["Source"] == "/srv/runs" and mount["Target"] == "/app/runs"


# ---------------------------------------------------------------- .torchxconfig


def _torchxconfig() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.optionxform = str  # torchx keys are case-sensitive
    cfg.read(REPO / ".torchxconfig")
    return cfg


def test_torchxconfig_names_real_options():
    cfg = _torchxconfig()
    schedulers = get_scheduler_factories()
    for section in cfg.sections():
        if section.startswith("component:"):
            path, _, fn_name = section[len("component:") :].rpartition(":")
            assert path == COMPONENTS, section
            params = inspect.signature(getattr(components, fn_name)).parameters
            for key in cfg[section]:
                assert key in params and params[key].kind is not inspect.Parameter.VAR_POSITIONAL, (section, key)
        else:
            assert section in schedulers, section
            runopts = schedulers[section](session_name="test").run_opts()
            for key in cfg[section]:
                assert runopts.get(key) is not None, (section, key)


def test_torchxconfig_component_defaults_apply(monkeypatch):
    monkeypatch.delenv("TORCHXCONFIG", raising=False)
    defaults = load_sections("component", dirs=[str(REPO)])
    assert set(defaults) == {f"{COMPONENTS}:{n}" for n in ("train", "collapse", "evaluate")}
    monkeypatch.chdir(REPO)  # component paths are relative to the directory torchx runs from
    with get_runner(component_defaults=defaults) as runner:
        info = runner.dryrun_component(
            f"{COMPONENTS}:train",
            ["--config", "configs/tiny.yaml"],
            "local_cwd",
            cfg={"log_dir": "/tmp/unused"},
            workspace=None,
        )
    (role,) = info._app.roles
    assert role.image == defaults[f"{COMPONENTS}:train"]["image"]
    assert f"--nproc_per_node {defaults[f'{COMPONENTS}:train']['j'].split('x')[1]}" in role.args[1]


# ---------------------------------------------------------------- a real job on local_cwd


def _log_json(out: str, prefix: str) -> dict:
    """The JSON object a replica printed, from torchx's `ROLE/REPLICA [RANK]:line` log stream."""
    lines = [line.split(":", 1)[1] for line in out.splitlines() if line.startswith(prefix)]
    text = "\n".join(lines)
    return json.loads(text[text.index("{") : text.rindex("}") + 1])


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("mlet_torchrec.training.train") is None,
    reason="mlet_torchrec.training.train not available yet",
)
def test_local_cwd_two_process_train_collapse_evaluate(tmp_path):
    from data_pipes.synth import SynthConfig, generate

    data, run, collapsed, logs = tmp_path / "data", tmp_path / "run", tmp_path / "collapsed", tmp_path / "logs"
    generate(
        SynthConfig(
            rows=4000, num_dense=4, num_sparse=5, min_cardinality=10, max_cardinality=2000, row_group_size=512, seed=3
        ),
        data,
        progress=False,
    )
    local = ["run", "-s", "local_cwd", "-cfg", f"log_dir={logs}"]

    # 1 node x 2 processes; --max_restarts also checks that torchrun takes the flag the component adds
    out = _torchx(
        *local,
        f"{COMPONENTS}:train",
        "--config",
        "configs/tiny.yaml",
        "-j",
        "1x2",
        "--max_restarts",
        "1",
        "--input",
        str(data),
        "--output",
        str(run),
        timeout=600,
    )
    assert out.stdout.startswith("local_cwd://")  # the app handle; _torchx checked that the job SUCCEEDED
    assert "OMP_NUM_THREADS" not in out.stdout + out.stderr  # the component sets it as torchrun would: no banner
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] > 0
    assert (run / "checkpoints" / "LATEST").is_file()

    out = _torchx(*local, f"{COMPONENTS}:collapse", "--input", str(run), "--output", str(collapsed), timeout=600)
    assert "max |p_collapsed - p_factored|" in out.stdout + out.stderr
    assert (collapsed / "manifest.json").is_file()

    out = _torchx(*local, f"{COMPONENTS}:evaluate", "--input", str(collapsed), "--json", "True", timeout=600)
    result = _log_json(out.stdout + out.stderr, "evaluate/0")
    assert abs(result["auc"] - metrics["test"]["auc"]) < 1e-5
