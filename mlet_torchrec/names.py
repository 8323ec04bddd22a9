"""The one rule for names read from files (manifests, data set metadata, DCP metadata) that become paths.

A name that becomes one path component passes :func:`check_name`; a relative path read from a file passes
:func:`check_relative`; the path built from it is resolved and proven to lie inside its directory by
:func:`path_inside`. Anything else is a one-line :class:`UnsafeName`.
"""

from __future__ import annotations

import os
from pathlib import Path

from mlet_torchrec.errors import UserError


class UnsafeName(UserError):
    """A name read from a file, config or request that would escape the directory it names a path in."""


_NAME_LIMIT = 200  # bytes of UTF-8: file systems allow 255 per component, and mlet adds suffixes


def check_name(name: object, what: str) -> str:
    """The one rule for a name that becomes one path component (a table, feature or file name).

    Refused, in one line naming ``what``: a non-string, the empty string, ``.`` and ``..``, a leading
    dot (hidden files are mlet's temporaries and DCP's metadata), path separators, control characters,
    text that is not valid UTF-8 (lone surrogates) and names longer than 200 bytes.

        >>> check_name("t_C1", "table name")
        't_C1'
        >>> check_name("../../victim", "table name in manifest.json")
        Traceback (most recent call last):
        ...
        mlet_torchrec.names.UnsafeName: table name in manifest.json '../../victim' is not a plain file name ...
    """
    if not isinstance(name, str):
        raise UnsafeName(f"{what} {name!r} is not a string")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise UnsafeName(f"{what} {name!r} is not valid UTF-8") from None
    if (
        not name
        or name.startswith(".")
        or any(c in name for c in "/\\")
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
        or size > _NAME_LIMIT
    ):
        raise UnsafeName(
            f"{what} {name!r} is not a plain file name (non-empty, at most {_NAME_LIMIT} bytes, no path "
            "separators, no leading dot, no control characters)"
        )
    return name


def check_relative(relative: object, what: str) -> str:
    """A relative path read from a file (``train/part-00000.parquet``): each ``/``-separated part obeys
    :func:`check_name`, so it cannot be absolute or climb out with ``..``.

        >>> check_relative("train/part-00000.parquet", "split file")
        'train/part-00000.parquet'
    """
    if not isinstance(relative, str):
        raise UnsafeName(f"{what} {relative!r} is not a string")
    if relative.startswith("/"):
        raise UnsafeName(f"{what} {relative!r} is an absolute path; it must be relative to its directory")
    for part in relative.split("/"):
        if part in ("", ".", ".."):
            raise UnsafeName(f"{what} {relative!r} must be a plain relative path (no '..', '.' or empty parts)")
        check_name(part, what)
    return relative


def path_inside(root: Path | str, relative: str, what: str) -> Path:
    """``root / relative`` after :func:`check_relative`, resolved (symlinks followed) and proven to lie
    inside the resolved ``root``; refused in one line otherwise.

        >>> import tempfile
        >>> base = Path(tempfile.mkdtemp())
        >>> path_inside(base, "tables/t_C1.npy", "table file") == base.resolve() / "tables" / "t_C1.npy"
        True
    """
    check_relative(relative, what)
    base = Path(os.path.abspath(os.path.expanduser(str(root)))).resolve()
    target = (base / relative).resolve()
    if base not in target.parents:
        raise UnsafeName(f"{what} {relative!r} leads outside {base} (through a symbolic link)")
    return target
