# mlet-torchrec image: the `mlet` command on the exact pinned stack of requirements*.txt.
#
#   docker build -t mlet-torchrec:cpu .                              # CPU (default)
#   docker build -t mlet-torchrec:cuda --build-arg VARIANT=cuda .    # CUDA
#   docker run --rm mlet-torchrec:cpu train --config configs/tiny.yaml run.dir=/app/runs/tiny
#
# The install steps are the Makefile's (`make install`), command for command, into a venv at
# /opt/venv; tests/test_dockerfile.py fails if the two drift apart.
#
# Why one base for both variants: PyTorch's CUDA wheels carry their own CUDA runtime, cuBLAS,
# cuDNN and NCCL as pip packages (torch 2.13.0 on PyPI: CUDA 13.0), and fbgemm-gpu's CUDA wheel
# uses torch's. The host only needs the NVIDIA driver and container toolkit (`docker run --gpus all`).
# An nvidia/cuda base would ship a second, possibly mismatched CUDA (several GB) and no Python 3.11.
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

# cpu | cuda (see docker/variant.sh); TORCH_INDEX_URL optionally adds a wheel index, e.g.
# https://download.pytorch.org/whl/cu128 for a CUDA 12.8 build.
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
RUN . docker/variant.sh && python -m pip install --upgrade -r requirements.txt -r requirements-dev.txt
# torchrec's metadata names the CUDA fbgemm-gpu; the pinned fbgemm-gpu(-cpu) above provides it.
RUN . docker/variant.sh && python -m pip install --no-deps -r requirements-torchrec.txt

# The project itself, editable as in the Makefile (so TorchX workspace images, which copy the
# working tree over /app, run the copied code).
COPY . .
RUN . docker/variant.sh && python -m pip install --no-deps -e . \
    && install -m 0755 docker/entrypoint.sh /usr/local/bin/mlet-entrypoint \
    && mkdir -p /app/runs /app/data \
    && chown mlet:mlet /app/runs /app/data

# Code and venv stay root-owned; runs/ and data/ (or mounts there) are the writable places.
# A numeric user lets Kubernetes check runAsNonRoot.
USER 1000:1000

ENTRYPOINT ["/usr/local/bin/mlet-entrypoint"]
CMD ["--help"]
