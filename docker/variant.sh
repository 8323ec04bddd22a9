# Sourced (`. docker/variant.sh`) by the Dockerfile before each pip install step, in /app.
# Chooses the torch/fbgemm-gpu build for $VARIANT without touching the pins of requirements.txt:
#   cpu:  torch==X from the PyTorch CPU wheel index (X+cpu), fbgemm-gpu-cpu==Y as pinned.
#   cuda: torch==X (not X+cpu) from PyPI (its Linux wheels are CUDA builds) or $TORCH_INDEX_URL,
#         and fbgemm-gpu==Y (the CUDA build, same version) in place of fbgemm-gpu-cpu==Y.
# $TORCH_INDEX_URL, when set, is added as an extra index for both variants (e.g.
# https://download.pytorch.org/whl/cu128 for an older driver: torch and fbgemm-gpu then both come
# as +cu128 builds, since pip prefers the local-version wheel of an exact pin); TORCH_INDEX_URL=none
# adds none (the package index already serves the wanted torch build, e.g. when offline).
# The package index itself (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_CERT) comes from
# the build secret $PIP_INDEX_ENV (docker/pip_index.py writes it from the host's pip config), which
# exists only while a RUN step runs, so no index URL or credential lands in a layer.
PIP_INDEX_ENV="${PIP_INDEX_ENV:-/run/secrets/pip-index}"
if [ -s "$PIP_INDEX_ENV" ]; then
    set -a
    # shellcheck disable=SC1090
    . "$PIP_INDEX_ENV"
    set +a
fi
case "${VARIANT:-}" in
    cpu)
        TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
        ;;
    cuda)
        sed -i 's/^fbgemm-gpu-cpu==/fbgemm-gpu==/' requirements.txt
        # and never torch X+cpu, which an index or find-links directory may also hold (pip would prefer it)
        sed -i -E 's/^torch==([^,+]+)$/torch==\1,!=\1+cpu/' requirements.txt
        if ! grep -q '^fbgemm-gpu==' requirements.txt; then
            echo "docker/variant.sh: requirements.txt has no fbgemm-gpu-cpu== pin to swap for CUDA" >&2
            exit 1
        fi
        ;;
    *)
        echo "docker/variant.sh: VARIANT must be cpu or cuda, got '${VARIANT:-}'" >&2
        exit 1
        ;;
esac
if [ -n "${TORCH_INDEX_URL:-}" ] && [ "$TORCH_INDEX_URL" != none ]; then
    export PIP_EXTRA_INDEX_URL="${PIP_EXTRA_INDEX_URL:+$PIP_EXTRA_INDEX_URL }$TORCH_INDEX_URL"
fi
