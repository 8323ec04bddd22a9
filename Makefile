# The two commands a new user needs: `make demo` and `make test`. Each creates .venv and installs
# the pinned stack on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo lint test test-fast bench gpu-check results clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-torchrec.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade -r requirements.txt -r requirements-dev.txt
	# torchrec's metadata names the CUDA fbgemm-gpu; fbgemm-gpu-cpu from requirements.txt replaces it.
	$(PY) -m pip install --no-deps -r requirements-torchrec.txt
	$(PY) -m pip install --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mlet demo

# Static checks (configured in pyproject.toml): lint, formatting, types. Part of `make test`.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Unit, multi-process (gloo), end-to-end tests and the docstring examples (--doctest-modules, pyproject.toml).
test: lint
	$(PY) -m pytest -q -ra

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py

# On one GPU, at most 8 minutes: CUDA tests, tiny train -> collapse -> evaluate on nccl, throughput at batch 8192.
# Writes benchmarks/results/gpu_check.md; without CUDA it says so in one line and exits 0.
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

# Every experiment store and report of docs/results (README there): makes the missing data sets (a sweep whose raw
# files in ../shared/data are absent is skipped, in one line), runs the families' sweeps with 2 workers, then
# re-renders every report from its store. A few hours on 2 CPU cores; stopped, it resumes where it stopped (the
# finished runs are in the stores). `mlet results run --dry-run` says what is left.
results: $(STAMP)
	$(VENV)/bin/mlet results run --jobs 2
	$(VENV)/bin/mlet results report

clean:
	rm -rf $(VENV) runs .pytest_cache

# Container image (README "Container image"); not part of `make test`/CI (minutes to build, see there).
# docker/build-image.sh uses podman, buildah or docker, whichever is present; podman/buildah settings
# this machine needs (runc, rlimits, network) are in docker/containers.conf, used by the script and tests.
.PHONY: image image-test image-packages
VARIANT ?= cpu
IMAGE ?= mlet-torchrec:$(VARIANT)
BASE_IMAGE ?=
IMAGE_BUILD := VARIANT=$(VARIANT) BASE_IMAGE=$(BASE_IMAGE) PYTHON=$(PYTHON) docker/build-image.sh

# As root on a machine with no usable builder (no podman or buildah, docker without a daemon), `image-packages`
# installs podman, buildah and runc (docker/containers.conf selects runc) and debootstrap (docker/bootstrap-base.sh
# builds the base image with it when no registry answers), as `slurm-packages` does for Slurm.
IMAGE_PACKAGES := podman buildah runc debootstrap

image-packages:
	@if [ "$$(id -u)" = 0 ] && ! command -v podman >/dev/null && ! command -v buildah >/dev/null \
		&& ! docker info >/dev/null 2>&1; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 \
		apt-get -o DPkg::Lock::Timeout=900 install -y -q $(IMAGE_PACKAGES); fi

image: image-packages
	IMAGE=$(IMAGE) $(IMAGE_BUILD)

# rebuilds (cached layers) the runtime image and the `test` stage, then runs them: tests/test_image.py
image-test: $(STAMP) image
	TARGET=test IMAGE=$(IMAGE)-test $(IMAGE_BUILD)
	MLET_IMAGE=$(IMAGE) MLET_IMAGE_REQUIRED=1 $(PY) -m pytest -q -s -ra -p no:cacheprovider tests/test_image.py

# TorchX on a real Slurm cluster (README "Running on Slurm"): a throwaway two-node cluster on this machine
# (launch/slurm/local_cluster.py) and tests/test_slurm.py against it. As root, `slurm-packages` installs the
# Debian packages when they are missing (RUNLEVEL=1: apt starts none of their system services).
.PHONY: slurm-packages slurm-test
SLURM_PACKAGES := slurmctld slurmd slurmdbd slurm-client munge mariadb-server

slurm-packages: $(STAMP)
	@if [ "$$(id -u)" = 0 ] && ! $(PY) -m launch.slurm.local_cluster check 2>/dev/null; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 \
		apt-get -o DPkg::Lock::Timeout=900 install -y -q $(SLURM_PACKAGES); fi

slurm-test: slurm-packages
	$(PY) -m launch.slurm.local_cluster check
	$(PY) -m pytest -q -ra -p no:cacheprovider --durations=0 tests/test_slurm.py
