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

MLET_SUBCOMMANDS=" train collapse export evaluate synth convert demo sweep report "

if [[ $# -gt 0 && "$1" != -* && "$MLET_SUBCOMMANDS" != *" $1 "* ]] && type -P "$1" >/dev/null; then
    exec "$@"
fi
exec mlet "$@"
