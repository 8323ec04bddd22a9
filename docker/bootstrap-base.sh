#!/usr/bin/env bash
# Makes a Debian bookworm base image with Python 3.11 for the Dockerfile when no registry can be
# reached (the Dockerfile's default base, python:3.11-slim, comes from Docker Hub):
#
#   docker/bootstrap-base.sh [TAG]          # default TAG: localhost/mlet-base:bookworm
#   make image BASE_IMAGE=TAG               # what `make image` does on its own when the pull fails
#
# debootstrap (apt-get install debootstrap; needs root) fetches the packages from a Debian mirror
# ($DEBIAN_MIRROR, default: the host's), and the root file system is imported with podman/buildah/docker.
# The image has python3.11 (as `python`), venv, ca-certificates and the `passwd` tools; no compilers.
set -euo pipefail

TAG="${1:-localhost/mlet-base:bookworm}"
SUITE="${DEBIAN_SUITE:-bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
BUILDER="${BUILDER:-$(for b in podman buildah docker; do command -v "$b" >/dev/null && { echo "$b"; break; }; done)}"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$(cd "$(dirname "$0")" && pwd)/containers.conf}"

die() { echo "bootstrap-base.sh: $*" >&2; exit 1; }
[ -n "$BUILDER" ] || die "no podman, buildah or docker on PATH (apt-get install podman runc)"
command -v debootstrap >/dev/null || die "debootstrap not installed (apt-get install debootstrap)"
[ "$(id -u)" = 0 ] || die "debootstrap needs root"

ROOTFS="$(mktemp -d "${TMPDIR:-/tmp}/mlet-base.XXXXXX")"
trap 'rm -rf "$ROOTFS"' EXIT
echo "bootstrap-base.sh: debootstrap $SUITE from $MIRROR into $ROOTFS"
debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
    "$SUITE" "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 \
    || { tail -n 20 "$ROOTFS.log" >&2; die "debootstrap failed (mirror $MIRROR unreachable? set DEBIAN_MIRROR); log: $ROOTFS.log"; }
rm -f "$ROOTFS.log"
# what an image does not need: apt lists and caches, docs, man pages
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb \
    "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* "$ROOTFS"/var/log/*.log
chroot "$ROOTFS" python --version >/dev/null || die "python missing from the bootstrapped root"

case "$BUILDER" in
    buildah)
        ctr="$(buildah from scratch)"
        buildah copy "$ctr" "$ROOTFS" / >/dev/null
        buildah config --cmd '["/bin/bash"]' --env LANG=C.UTF-8 "$ctr"
        buildah commit --format docker "$ctr" "$TAG" >/dev/null
        buildah rm "$ctr" >/dev/null
        ;;
    *)
        tar -C "$ROOTFS" --numeric-owner -c . | "$BUILDER" import --change 'CMD ["/bin/bash"]' \
            --change 'ENV LANG=C.UTF-8' - "$TAG" >/dev/null
        ;;
esac
echo "bootstrap-base.sh: imported $TAG ($("$BUILDER" image inspect --format '{{.Size}}' "$TAG" 2>/dev/null || echo '?') bytes)"
