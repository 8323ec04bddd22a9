# mlet-torchrec image: the `mlet` command on the exact pinned stack of requirements*.txt.
#
#   make image                         # CPU image mlet-torchrec:cpu, built with podman/buildah/docker
#   make image VARIANT=cuda            # CUDA image mlet-torchrec:cuda
#   make image-test                    # runs it: tests/test_image.py
#   podman run --rm mlet-torchrec:cpu train --config configs/tiny.yaml run.dir=/app/runs/tiny
#
# `make image` (docker/build-image.sh) passes the package index in as build secrets (pip-index,
# pip-cert; see docker/pip_index.py): no index URL or certificate is baked into a layer. A plain
# `docker build --target runtime -t mlet-torchrec:cpu .` also works where PyPI and
# download.pytorch.org are reachable (no secrets needed then).
#
# Stages: `base` installs the runtime stack (requirements.txt, torchrec --no-deps, the project)
# into a venv at /opt/venv; `test` adds requirements-dev.txt (pytest, hypothesis, hadolint, ...);
# `runtime` (the default, last stage) is `base` as is: no test tools and no compilers. The install
# steps are the Makefile's (`make install`), command for command, with the dev requirements moved
# to the test stage; tests/test_dockerfile.py fails if the two drift apart.
#
# Why one base for both variants: PyTorch's CUDA wheels carry their own CUDA runtime, cuBLAS,
# cuDNN and NCCL as pip packages (torch 2.13.0 on PyPI: CUDA 13.0), and fbgemm-gpu's CUDA wheel
# uses torch's. The host only needs the NVIDIA driver and container toolkit (`docker run --gpus all`,
# `podman run --device nvidia.com/gpu=all`). An nvidia/cuda base would ship a second, possibly
# mismatched CUDA (several GB) and no Python 3.11; any base with Python 3.11 as `python` works
# (`make image BASE_IMAGE=...`). Without a registry, `make image` makes the base with
# docker/bootstrap-base.sh (debootstrap, Debian bookworm: Python 3.11).
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE} AS base

# cpu | cuda (see docker/variant.sh); TORCH_INDEX_URL optionally adds a wheel index, e.g.
# https://download.pytorch.org/whl/cu128 for a CUDA 12.8 build, or `none`.
ARG VARIANT=cpu
ARG TORCH_INDEX_URL=""

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MLET_IMAGE_VARIANT=${VARIANT}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN python -m venv "$VIRTUAL_ENV" \
    && groupadd --gid 1000 mlet \
    && useradd --create-home --uid 1000 --gid 1000 --shell /bin/bash mlet

WORKDIR /app

# Dependencies first (their own layers, rebuilt only when a requirements file changes).
COPY requirements.txt requirements-dev.txt requirements-torchrec.txt ./
COPY docker/variant.sh docker/variant.sh
RUN --mount=type=secret,id=pip-index --mount=type=secret,id=pip-cert \
    . docker/variant.sh && python -m pip install --upgrade -r requirements.txt
# torchrec's metadata names the CUDA fbgemm-gpu; the pinned fbgemm-gpu(-cpu) above provides it.
RUN --mount=type=secret,id=pip-index --mount=type=secret,id=pip-cert \
    . docker/variant.sh && python -m pip install --no-deps -r requirements-torchrec.txt

# The project itself, editable as in the Makefile (so TorchX workspace images, which copy the
# working tree over /app, run the copied code).
COPY . .
RUN --mount=type=secret,id=pip-index --mount=type=secret,id=pip-cert \
    . docker/variant.sh && python -m pip install --no-deps -e . \
    && install -m 0755 docker/entrypoint.sh /usr/local/bin/mlet-entrypoint \
    && mkdir -p /app/runs /app/data \
    && chown mlet:mlet /app/runs /app/data

# Code and venv stay root-owned; runs/ and data/ (or mounts there) are the writable places, so the
# image also runs with a read-only root file system. A numeric user lets Kubernetes check runAsNonRoot.
USER 1000:1000

ENTRYPOINT ["/usr/local/bin/mlet-entrypoint"]
CMD ["--help"]

# Test tools on top of the runtime stack: `make image-test` and CI-in-a-container use this one.
FROM base AS test
# build args are per stage: the same two as above
ARG VARIANT=cpu
ARG TORCH_INDEX_URL=""
USER 0
RUN --mount=type=secret,id=pip-index --mount=type=secret,id=pip-cert \
    . docker/variant.sh && python -m pip install --upgrade -r requirements.txt -r requirements-dev.txt
USER 1000:1000

# The default target: the runtime stack only.
FROM base AS runtime
