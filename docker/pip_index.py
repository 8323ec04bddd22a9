"""Writes the host's pip package-index settings as build secrets for docker/build-image.sh.

    python docker/pip_index.py SECRETS_DIR     # prints the host directories the build must mount
    python docker/pip_index.py --probe URL     # exit 0 if URL answers (with the CA bundle pip uses)

Reads what pip itself would use (`pip config list`: PIP_* environment variables, then the
[install] and [global] sections of the config files) for index-url, extra-index-url,
find-links, trusted-host, no-index and cert, and writes

    SECRETS_DIR/pip-index.env   shell assignments PIP_INDEX_URL=... (sourced by docker/variant.sh)
    SECRETS_DIR/pip-cert        a copy of the CA bundle pip trusts here (empty if none is set)

Both reach the build as `--secret`s: mounted only during the RUN steps that install, never
written into a layer or the image history. Each index is probed first; when none answers, it
exits 2 with a one-line error (as does a file:// location that does not exist). Local
locations (file:// URLs, find-links directories; for an index ending in /simple its parent,
where the wheels usually lie) are printed, one per line, for the builder to mount read-only at
the same path (podman/buildah `build -v`).
"""

from __future__ import annotations

import os
import shlex
import ssl
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

KEYS = ("index-url", "extra-index-url", "find-links", "trusted-host", "no-index", "cert")
DEFAULT_INDEX = "https://pypi.org/simple"


def pip_settings(python: str) -> dict:
    out = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True).stdout
    found: dict = {}
    for line in out.splitlines():
        name, sep, value = line.partition("=")
        if not sep:
            continue
        section, _, key = name.rpartition(".")
        if key not in KEYS:
            continue
        value = value.strip().strip("'\"")
        rank = {":env:": 0, "install": 1, "global": 2}.get(section)
        if rank is not None and (key not in found or rank < found[key][0]):
            found[key] = (rank, value)
    return {key: value for key, (_, value) in found.items()}


def _local_path(location: str) -> Path | None:
    if location.startswith("file:"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(location).path))
    if "://" not in location:
        return Path(location)
    return None


def reachable(url: str, cafile: str | None, timeout: float = 15.0) -> str | None:
    """None if the index answers, else why not."""
    try:
        context = ssl.create_default_context(cafile=cafile or None)
        with urllib.request.urlopen(url.rstrip("/") + "/", timeout=timeout, context=context) as response:
            response.read(1)
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
        return f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"


def main() -> int:
    python = os.environ.get("PIP_CONFIG_PYTHON", sys.executable)
    settings = pip_settings(python)
    if sys.argv[1] == "--probe":
        return 0 if reachable(sys.argv[2], settings.get("cert"), timeout=10) is None else 1
    secrets = Path(sys.argv[1])
    no_index = settings.get("no-index", "").lower() in ("1", "true", "yes", "on")
    extra = settings.get("extra-index-url", "").split()
    indexes = [] if no_index else [settings.get("index-url", DEFAULT_INDEX), *extra]
    find_links = settings.get("find-links", "").split()
    cert = settings.get("cert", "")

    mounts, usable, problems = [], [], []
    for location in [*indexes, *find_links]:
        path = _local_path(location)
        if path is not None:
            if path.exists():
                path = path.resolve()
                # a PEP 503 tree ROOT/simple/NAME/index.html usually links into ROOT/files or ROOT/packages
                mounts.append(str(path.parent if path.name == "simple" else path))
                usable.append(location)
            else:
                problems.append(f"{location} (no such directory)")
        else:
            why = reachable(location, cert)
            (problems.append(f"{location} ({why})") if why else usable.append(location))
    if not usable:
        print(
            "make image: no package index reachable (checked "
            + ", ".join(problems or ["nothing"])
            + "); the image installs from the host's pip index: set PIP_INDEX_URL or "
            "`pip config set global.index-url URL`",
            file=sys.stderr,
        )
        return 2
    for problem in problems:
        print(f"make image: warning: package location unusable, pip will skip it: {problem}", file=sys.stderr)

    secrets.mkdir(parents=True, exist_ok=True)
    env = {
        "PIP_INDEX_URL": settings.get("index-url"),
        "PIP_EXTRA_INDEX_URL": settings.get("extra-index-url"),
        "PIP_FIND_LINKS": settings.get("find-links"),
        "PIP_TRUSTED_HOST": settings.get("trusted-host"),
        "PIP_NO_INDEX": "1" if no_index else None,
        "PIP_CERT": "/run/secrets/pip-cert" if cert else None,
    }
    lines = [f"{k}={shlex.quote(v)}" for k, v in env.items() if v]
    (secrets / "pip-index.env").write_text("".join(line + "\n" for line in lines))
    (secrets / "pip-cert").write_bytes(Path(cert).read_bytes() if cert else b"")
    for mount in dict.fromkeys(mounts):
        print(mount)
    return 0


if __name__ == "__main__":
    sys.exit(main())
