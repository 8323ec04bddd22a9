#!/usr/bin/env bash
# `make image`: builds the image offline-capable with podman, buildah or docker (first one found).
#
#   docker/build-image.sh                        # mlet-torchrec:cpu (runtime stage)
#   VARIANT=cuda docker/build-image.sh           # mlet-torchrec:cuda
#   TARGET=test docker/build-image.sh            # mlet-torchrec:cpu-test (adds the dev/test tools)
#
# Settings (environment; the Makefile passes its variables): VARIANT (cpu|cuda), TARGET
# (runtime|test), IMAGE (tag), BASE_IMAGE (default python:3.11-slim), BUILDER (podman|buildah|docker),
# TORCH_INDEX_URL (extra torch wheel index, `none` for none; default: the PyTorch CPU index for cpu
# when it answers, else none), PYTHON (whose pip config names the package index).
#
# 1. Base: BASE_IMAGE if present locally or pullable; if the default base cannot be pulled (no
#    registry), localhost/mlet-base:bookworm, made once by docker/bootstrap-base.sh (debootstrap).
# 2. Index: docker/pip_index.py turns the host's pip settings into two build secrets (never layers)
#    and names local index directories (file://, find-links), mounted read-only into the build.
# 3. podman/buildah settings (runtime, rlimits, network) come from docker/containers.conf.
set -euo pipefail
cd "$(dirname "$0")/.."

VARIANT="${VARIANT:-cpu}"
TARGET="${TARGET:-runtime}"
DEFAULT_BASE="python:3.11-slim"
BASE_IMAGE="${BASE_IMAGE:-$DEFAULT_BASE}"
BOOTSTRAP_BASE="${BOOTSTRAP_BASE:-localhost/mlet-base:bookworm}"
PYTHON="${PYTHON:-$(command -v python3)}"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/docker/containers.conf}"
if [ "$TARGET" = runtime ]; then IMAGE="${IMAGE:-mlet-torchrec:$VARIANT}"; else IMAGE="${IMAGE:-mlet-torchrec:$VARIANT-$TARGET}"; fi

die() { echo "make image: $*" >&2; exit 1; }
case "$VARIANT" in cpu|cuda) ;; *) die "VARIANT must be cpu or cuda, got '$VARIANT'" ;; esac
case "$TARGET" in runtime|test) ;; *) die "TARGET must be runtime or test, got '$TARGET'" ;; esac

if [ -z "${BUILDER:-}" ]; then
    for candidate in podman buildah docker; do
        if command -v "$candidate" >/dev/null; then BUILDER="$candidate"; break; fi
    done
fi
[ -n "${BUILDER:-}" ] || die "no podman, buildah or docker on PATH (Debian: apt-get install podman runc)"
if [ "$BUILDER" = docker ] && ! docker info >/dev/null 2>&1; then
    die "docker has no daemon here; install podman (apt-get install podman runc) or start dockerd"
fi

image_exists() {
    case "$BUILDER" in
        buildah) buildah inspect --type image "$1" >/dev/null 2>&1 ;;
        *) "$BUILDER" image inspect "$1" >/dev/null 2>&1 ;;
    esac
}
qualified() {  # python:3.11-slim -> docker.io/library/python:3.11-slim (podman refuses ambiguous short names)
    local first="${1%%/*}"
    if [[ "$1" != */* ]]; then echo "docker.io/library/$1"
    elif [[ "$first" != *.* && "$first" != *:* && "$first" != localhost ]]; then echo "docker.io/$1"
    else echo "$1"; fi
}

# --- 1. the base image -------------------------------------------------------------------------
base="$(qualified "$BASE_IMAGE")"
if ! image_exists "$base"; then
    if timeout 120 "$BUILDER" pull -q "$base" >/dev/null 2>&1; then
        :
    elif [ "$BASE_IMAGE" = "$DEFAULT_BASE" ]; then
        echo "make image: cannot pull $base (no registry); using $BOOTSTRAP_BASE (debootstrap bookworm)" >&2
        base="$BOOTSTRAP_BASE"
        if ! image_exists "$base"; then
            BUILDER="$BUILDER" docker/bootstrap-base.sh "$base" \
                || die "no base image: $DEFAULT_BASE cannot be pulled and docker/bootstrap-base.sh failed"
        fi
    else
        die "base image $BASE_IMAGE is neither local nor pullable (podman images; BASE_IMAGE=...)"
    fi
fi

# --- 2. the package index, as build secrets ------------------------------------------------------
secrets="$(mktemp -d "${TMPDIR:-/tmp}/mlet-image-secrets.XXXXXX")"
trap 'rm -rf "$secrets"' EXIT
chmod 700 "$secrets"
mounts="$(PIP_CONFIG_PYTHON="$PYTHON" "$PYTHON" docker/pip_index.py "$secrets")" \
    || exit 1  # pip_index.py has said why, in one line
if [ -z "${TORCH_INDEX_URL+set}" ]; then
    TORCH_INDEX_URL=""
    if [ "$VARIANT" = cpu ] && ! PIP_CONFIG_PYTHON="$PYTHON" "$PYTHON" docker/pip_index.py --probe https://download.pytorch.org/whl/cpu/; then
        echo "make image: download.pytorch.org unreachable; torch comes from the host's index alone" >&2
        TORCH_INDEX_URL=none
    fi
fi

args=(--target "$TARGET" -t "$IMAGE" --build-arg "PYTHON_IMAGE=$base" --build-arg "VARIANT=$VARIANT"
      --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL"
      --secret "id=pip-index,src=$secrets/pip-index.env" --secret "id=pip-cert,src=$secrets/pip-cert")
volumes=()
while IFS= read -r dir; do
    [ -n "$dir" ] && volumes+=(-v "$dir:$dir:ro")
done <<<"$mounts"

echo "make image: $BUILDER building $IMAGE (target $TARGET, variant $VARIANT) on $base" >&2
start=$(date +%s)
case "$BUILDER" in
    podman|buildah)
        "$BUILDER" build --format docker --layers "${args[@]}" "${volumes[@]}" . ;;
    docker)
        [ ${#volumes[@]} -eq 0 ] || die "the pip index uses local directories ($mounts); docker build cannot mount them, use podman or buildah"
        DOCKER_BUILDKIT=1 docker build "${args[@]}" . ;;
esac
seconds=$(( $(date +%s) - start ))
size="$("$BUILDER" image inspect --format '{{.Size}}' "$IMAGE" 2>/dev/null || echo 0)"
echo "make image: built $IMAGE in ${seconds} s, $(( size / 1000000 )) MB" >&2
