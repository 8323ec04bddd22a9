"""TorchX components that run the ``mlet`` command: ``train``, ``collapse``, ``evaluate``, ``predict`` and ``convert``.

Each one is a thin wrapper around TorchX's builtin ``dist.ddp`` (torchrun under the hood), so the
same component runs on every TorchX scheduler; only ``-s`` and the image change::

    torchx run -s local_cwd    launch/components.py:train --config configs/tiny.yaml -j 1x2
    torchx run -s local_docker launch/components.py:train --image mlet-torchrec:cpu --config ... -j 1x2
    torchx run -s kubernetes   launch/components.py:train --image REG/mlet-torchrec:cuda --gpu 8 -j 2x8 --config ...
    torchx run -s slurm        launch/components.py:train --gpu 8 -j 2x8 --config ...

``mlet train`` joins the process group that torchrun sets up (gloo on CPU, nccl on CUDA, chosen by
the trainer from the visible devices), so GPUs only need ``--gpu N`` with ``-j NODESxN``.
Config overrides (``key.sub=value``) go last on the command line: everything after the first one
is handed to ``mlet train`` unchanged.

Restarts on failure, two levels (both default to 0):

* ``max_retries``: the scheduler resubmits the whole job (Kubernetes/Volcano ``maxRetry``, Slurm
  ``--requeue``, Docker's ``on-failure`` restart policy; ``local_cwd`` has no retries).
* ``max_restarts`` (``train`` and ``convert``): torchrun restarts all workers in place (``--max-restarts``);
  works on every scheduler, ``local_cwd`` included.

A restarted ``mlet train`` resumes in the same ``run.dir`` from its newest complete checkpoint (model,
optimizer state, data position, RNG; ``run.resume``, on by default): set ``train.checkpoint_every``.
A restarted ``mlet convert`` keeps the shards that were counted or encoded (data_pipes/convert/ranks.py).

Do not add ``from __future__ import annotations`` here, nor write ``X | None`` or ``dict[...]``:
TorchX reads the real annotations to build each component's command line, and its component
linter knows only ``typing``'s ``Optional``, ``Dict`` and ``List`` (ruff's UP rules are off here).
"""

from typing import Any, Dict, List, Optional

import torchx.specs as specs
from torchx.components import dist
from torchx.specs.finder import ComponentValidationException

MODULE = "mlet_torchrec.cli"
"""What every replica runs, as ``python -m mlet_torchrec.cli`` (the ``mlet`` console script)."""

DEFAULT_IMAGE = "mlet-torchrec:cpu"
"""The tag the README's ``docker build`` gives the CPU image (ignored by local_cwd and slurm)."""


class ComponentArgError(ComponentValidationException, ValueError):  # type: ignore[misc]  # torchx is untyped (py.typed absent)
    """A bad component argument: ``torchx run`` prints it in one line (no traceback) and exits 1."""


def _check_j(j: str, gpu: int) -> None:
    _, _, nproc_per_node, _ = dist.parse_nnodes(j)
    if gpu > 0 and nproc_per_node > gpu:
        raise ComponentArgError(f"-j {j} starts {nproc_per_node} processes per node but only {gpu} GPUs were requested")


def _job_env(env: Optional[Dict[str, str]], j: str) -> Dict[str, str]:
    # torchrun sets OMP_NUM_THREADS=1 for every worker of a multi-process node when it is unset, and says so
    # in a banner on every run; set it here the same way (a user's own value wins), so the banner never shows.
    _, _, nproc_per_node, _ = dist.parse_nnodes(j)
    out = dict(env or {})
    if nproc_per_node > 1:
        out.setdefault("OMP_NUM_THREADS", "1")
    return out


def _single_role(app: specs.AppDef, role_name: str) -> specs.AppDef:
    # dist.ddp names the role after the module ("cli"); name it after the subcommand instead, so
    # pods, containers and Slurm jobs read e.g. mlet-train-xxxx-train-0.
    (role,) = app.roles
    role.name = role_name
    return app


def _mlet_job(
    verb_args: List[str],
    *,
    j: str,
    gpu: int,
    env: Optional[Dict[str, str]],
    **ddp_args: Any,
) -> specs.AppDef:
    # Every component: check -j against the GPUs, run ``mlet VERB ...`` through dist.ddp (torchrun) on
    # every process of the job, and name the role after the verb.
    _check_j(j, gpu)
    app = dist.ddp(*verb_args, m=MODULE, j=j, gpu=gpu, env=_job_env(env, j), **ddp_args)
    return _single_role(app, verb_args[0])


def _with_max_restarts(app: specs.AppDef, max_restarts: int) -> specs.AppDef:
    # dist.ddp's role runs `bash -c "torchrun ..."` and has no option for torchrun's in-place
    # restarts; add the flag to that command line.
    if max_restarts < 0:
        raise ComponentArgError(f"max_restarts must be >= 0, got {max_restarts}")
    if max_restarts:
        role = app.roles[0]
        flag, cmd = role.args
        if flag != "-c" or not cmd.startswith("torchrun "):
            raise RuntimeError(f"unexpected dist.ddp command line, cannot add --max-restarts: {role.args}")
        role.args = [flag, f"torchrun --max-restarts {max_restarts} " + cmd[len("torchrun ") :]]
        # torchrun's shared rendezvous TCPStore keeps the dead workers' keys: restarted workers on
        # several nodes would connect to stale addresses (mlet_torchrec/training/distributed.py isolates one node)
        role.env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    return app


def train(
    config: str,
    *overrides: str,
    input: Optional[str] = None,
    output: Optional[str] = None,
    seed: Optional[int] = None,
    j: str = "1x2",
    image: str = DEFAULT_IMAGE,
    name: str = "mlet-train",
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    max_retries: int = 0,
    max_restarts: int = 0,
    rdzv_port: int = 29500,
    debug: bool = False,
) -> specs.AppDef:
    """Train a model: ``mlet train --config CONFIG [--input DATA] [--output RUN_DIR] [--seed S] [key.sub=value ...]``
    on every process of the job.

    Args:
        config: YAML config, a path inside the image's working directory (/app) or, for local_cwd
            and slurm, relative to the directory torchx runs from
        overrides: config overrides ``key.sub=value`` (e.g. ``train.epochs=2``); put them last
        input: data set directory (short for ``data.path=...``)
        output: run directory (short for ``run.dir=...``), on a file system every node sees
        seed: seed of initialisation and data order (short for ``train.seed=...``)
        j: ``{nnodes}x{nproc_per_node}`` (``[{min_nnodes}:]{nnodes}x{nproc_per_node}`` for elastic);
            with GPUs, nproc_per_node must not exceed ``gpu``
        image: container image (local_docker, kubernetes); local_cwd and slurm run the current
            directory's environment instead
        name: job name, ``{experiment}/{run}`` or ``{run}``
        h: a registered TorchX named resource; takes precedence over cpu, gpu and memMB
        cpu: CPUs per node (replica)
        gpu: GPUs per node; > 0 makes the trainer use CUDA and nccl
        memMB: memory per node in MB
        env: extra environment variables, ``A=1,B=2``
        mounts: volumes for docker/kubernetes, e.g. ``type=bind,src=/data,dst=/app/data``
            (kubernetes: ``type=volume,src=PVC_NAME,dst=/app/runs``)
        max_retries: whole-job resubmissions by the scheduler on failure (not on local_cwd)
        max_restarts: in-place restarts of all workers by torchrun on failure (every scheduler)
        rdzv_port: port of the c10d rendezvous on the first node (multi-node jobs only)
        debug: turn on TorchX's distributed debug environment variables
    """
    shorthands: List[str] = []
    for flag, value in (("--input", input), ("--output", output), ("--seed", seed)):
        shorthands += [flag, str(value)] if value is not None else []
    app = _mlet_job(
        ["train", "--config", config, *shorthands, *overrides],
        image=image,
        name=name,
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=j,
        env=env,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
        mounts=mounts,
        debug=debug,
    )
    return _with_max_restarts(app, max_restarts)


def collapse(
    input: str,
    output: str,
    check_split: str = "test",
    overwrite: bool = False,
    j: str = "1x1",
    image: str = DEFAULT_IMAGE,
    name: str = "mlet-collapse",
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    max_retries: int = 0,
) -> specs.AppDef:
    """Collapse: ``mlet collapse --input INPUT --output OUTPUT`` (W = W1·W2) on every process of the job
    (each multiplies the W1 shards it holds; the prediction check is sharded too).

    Args:
        input: a training run directory or one of its checkpoints
        output: directory for the plain d-dim model (must be empty unless ``overwrite``)
        check_split: split whose predictions are compared with the factored model, or ``none``
        overwrite: replace an existing output directory
        j: ``{nnodes}x{nproc_per_node}``, as for ``train``; with GPUs, nproc_per_node must not exceed ``gpu``
        image: container image (local_docker, kubernetes)
        name: job name, ``{experiment}/{run}`` or ``{run}``
        h: a registered TorchX named resource; takes precedence over cpu, gpu and memMB
        cpu: CPUs
        gpu: GPUs
        memMB: memory in MB
        env: extra environment variables, ``A=1,B=2``
        mounts: volumes for docker/kubernetes, e.g. ``type=bind,src=/runs,dst=/app/runs``
        max_retries: resubmissions by the scheduler on failure (not on local_cwd)
    """
    args = ["collapse", "--input", input, "--output", output, "--check-split", check_split]
    if overwrite:
        args.append("--overwrite")
    return _mlet_job(
        args,
        image=image,
        name=name,
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=j,
        env=env,
        max_retries=max_retries,
        mounts=mounts,
    )


def evaluate(
    input: str,
    split: str = "test",
    auc: str = "histogram",
    json: bool = False,
    j: str = "1x1",
    image: str = DEFAULT_IMAGE,
    name: str = "mlet-evaluate",
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    max_retries: int = 0,
) -> specs.AppDef:
    """Evaluate: ``mlet evaluate --input INPUT --split SPLIT --auc AUC`` on every process of the job (each
    scores its slice); rank 0 logs what it scored and the metrics.

    Args:
        input: a training run directory or checkpoint, or a ``collapse`` output directory
        split: data split to evaluate
        auc: ``histogram`` (bounded memory, error bound reported) or ``exact`` (scores streamed to rank 0)
        json: rank 0 logs every metric as JSON instead of a two-line summary
        j: ``{nnodes}x{nproc_per_node}``, as for ``train``; with GPUs, nproc_per_node must not exceed ``gpu``
        image: container image (local_docker, kubernetes)
        name: job name, ``{experiment}/{run}`` or ``{run}``
        h: a registered TorchX named resource; takes precedence over cpu, gpu and memMB
        cpu: CPUs
        gpu: GPUs
        memMB: memory in MB
        env: extra environment variables, ``A=1,B=2``
        mounts: volumes for docker/kubernetes, e.g. ``type=bind,src=/runs,dst=/app/runs``
        max_retries: resubmissions by the scheduler on failure (not on local_cwd)
    """
    return _mlet_job(
        ["evaluate", "--input", input, "--split", split, "--auc", auc, *(["--json"] if json else [])],
        image=image,
        name=name,
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=j,
        env=env,
        max_retries=max_retries,
        mounts=mounts,
    )


def predict(
    input: str,
    output: str,
    data: Optional[str] = None,
    split: str = "test",
    precision: Optional[str] = None,
    overwrite: bool = False,
    j: str = "1x1",
    image: str = DEFAULT_IMAGE,
    name: str = "mlet-predict",
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    max_retries: int = 0,
) -> specs.AppDef:
    """Batch scoring: ``mlet predict --input INPUT --output OUTPUT [--data DATA] --split SPLIT`` on every process
    of the job (each scores its slice of the split into a part file beside OUTPUT; rank 0 writes the Parquet file).

    Args:
        input: a training run directory or checkpoint, a ``collapse`` output or an ``export`` dir
        output: the Parquet file to write, on a file system every node sees
        data: data set to score (default: the model's own), converted ``--features-from`` the model
        split: data split to score
        precision: an export's ``int8`` (default) or ``fp32`` model; runs and collapse outputs are FP32
        overwrite: replace an output file that ``mlet predict`` wrote
        j: ``{nnodes}x{nproc_per_node}``, as for ``train``; with GPUs, nproc_per_node must not exceed ``gpu``
        image: container image (local_docker, kubernetes)
        name: job name, ``{experiment}/{run}`` or ``{run}``
        h: a registered TorchX named resource; takes precedence over cpu, gpu and memMB
        cpu: CPUs
        gpu: GPUs
        memMB: memory in MB
        env: extra environment variables, ``A=1,B=2``
        mounts: volumes for docker/kubernetes, e.g. ``type=bind,src=/runs,dst=/app/runs``
        max_retries: resubmissions by the scheduler on failure (not on local_cwd)
    """
    args = ["predict", "--input", input, "--output", output, "--split", split]
    args += ["--data", data] if data is not None else []
    args += ["--precision", precision] if precision is not None else []
    args += ["--overwrite"] if overwrite else []
    return _mlet_job(
        args,
        image=image,
        name=name,
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=j,
        env=env,
        max_retries=max_retries,
        mounts=mounts,
    )


def convert(
    *dataset: str,
    j: str = "1x2",
    image: str = DEFAULT_IMAGE,
    name: str = "mlet-convert",
    h: Optional[str] = None,
    cpu: int = 2,
    memMB: int = 4096,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    max_retries: int = 0,
    max_restarts: int = 0,
    rdzv_port: int = 29500,
) -> specs.AppDef:
    """Convert raw files on every process of the job: ``mlet convert DATASET [FLAGS]`` (e.g. ``criteo --input DIR
    --output DATA``), each process one rank that counts and encodes its share of the
    shards; rank 0 merges the vocabularies, writes the data set and prints the summary. Its component
    options go first, the ``mlet convert`` command line last::

        torchx run -s slurm launch/components.py:convert -j 4x16 --cpu 16 \\
            criteo --input /shared/criteo_1tb --output /shared/data/criteo1tb --hash-buckets 40000000

    Args:
        dataset: the data set (criteo, avazu, movielens), then its ``mlet convert`` flags (put them last);
            ``--input`` and ``--output`` on a file system every node sees
        j: ``{nnodes}x{nproc_per_node}``: ranks per node (one process each; ``--jobs`` stays 1)
        image: container image (local_docker, kubernetes); local_cwd and slurm run the current
            directory's environment instead
        name: job name, ``{experiment}/{run}`` or ``{run}``
        h: a registered TorchX named resource; takes precedence over cpu and memMB
        cpu: CPUs per node (replica): about one per rank
        memMB: memory per node in MB
        env: extra environment variables, ``A=1,B=2``
        mounts: volumes for docker/kubernetes, e.g. ``type=bind,src=/data,dst=/app/data``
        max_retries: whole-job resubmissions by the scheduler on failure (not on local_cwd)
        max_restarts: in-place restarts of all workers by torchrun on failure (every scheduler)
        rdzv_port: port of the c10d rendezvous on the first node (multi-node jobs only)
    """
    if not dataset or dataset[0].startswith("-"):
        raise ComponentArgError(
            "give the mlet convert command line last: DATASET --input ... --output ... "
            f"(DATASET: criteo, avazu or movielens), got {list(dataset)}"
        )
    app = _mlet_job(
        ["convert", *dataset],
        image=image,
        name=name,
        h=h,
        cpu=cpu,
        gpu=0,
        memMB=memMB,
        j=j,
        env=env,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
        mounts=mounts,
    )
    return _with_max_restarts(app, max_restarts)
