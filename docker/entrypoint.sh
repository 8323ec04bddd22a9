#!/usr/bin/env bash
# Container entrypoint: runs `mlet`, or a program of the image when asked for one.
#
#   docker run IMAGE train --config configs/tiny.yaml ...   -> mlet train --config configs/tiny.yaml ...
#   docker run IMAGE                                        -> mlet --help (the image's CMD)
#   docker run IMAGE bash -c "torchrun ..."                 -> bash -c "torchrun ..."
#
# The pass-through matters for TorchX: its local_docker scheduler starts every replica with the
# image's entrypoint and `bash -c "torchrun ... -m mlet_torchrec.cli ..."` as arguments (Kubernetes
# replaces the entrypoint itself). A first argument that is an executable on PATH (bash, python,
# torchrun, mlet, pytest, ...; `type -P` ignores shell builtins) is run as given, unless it is one
# of mlet's subcommands (kept equal to mlet_torchrec/cli/main.py's by tests/test_dockerfile.py);
# anything else goes to mlet.
set -euo pipefail

MLET_SUBCOMMANDS=" train collapse export serve evaluate predict synth convert demo sweep report plan results advise compression "

if [[ $# -gt 0 && "$1" != -* && "$MLET_SUBCOMMANDS" != *" $1 "* ]] && type -P "$1" >/dev/null; then
    exec "$@"
fi

# The image runs as uid 1000, often with a read-only root file system: an output directory that is
# not on a writable mount would end in a PermissionError traceback deep in mlet. Say it in one line
# first, for the outputs named on the command line (--output DIR, run.dir=DIR).
require_writable() {
    local dir="$1" probe
    [[ "$dir" == /* ]] || dir="$PWD/$dir"
    probe="$dir"
    while [[ ! -e "$probe" && "$probe" != / ]]; do probe="$(dirname "$probe")"; done
    if [[ -d "$probe" && ! -w "$probe" ]]; then
        echo "mlet-entrypoint: cannot write $dir as uid $(id -u) ($probe is read-only or not writable): mount a writable directory there, e.g. -v \"\$PWD/runs:/app/runs\" -v \"\$PWD/data:/app/data\" owned by uid $(id -u)" >&2
        exit 2
    fi
}
if [[ $# -gt 0 && "$MLET_SUBCOMMANDS" == *" $1 "* ]]; then
    previous=""
    for arg in "$@"; do
        case "$previous" in --output) require_writable "$arg" ;; esac
        case "$arg" in --output=*) require_writable "${arg#*=}" ;; run.dir=*) require_writable "${arg#run.dir=}" ;; esac
        previous="$arg"
    done
fi
exec mlet "$@"
