"""The one exception type for a user's mistake.

A ``UserError`` (bad config, missing file, bad flag, malformed data, corrupt checkpoint, an output
path that would clobber something) is printed by ``mlet`` as one line naming the file, key or row,
and the command exits with status 2. Anything else is a bug: it keeps its traceback and exits 1.

    >>> try:
    ...     raise UserError("configs/x.yaml: unknown key 'trian'")
    ... except UserError as e:
    ...     print(e)
    configs/x.yaml: unknown key 'trian'
"""

from __future__ import annotations

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C


class UserError(Exception):
    """A mistake in what the user gave us; the message is one line that names the culprit."""

    exit_code = EXIT_USER_ERROR


class Interrupted(UserError):
    """The user pressed Ctrl-C (SIGINT): one line saying where the run stopped and how to go on; exit 130."""

    exit_code = EXIT_INTERRUPTED


class InputNotFound(UserError, FileNotFoundError):
    """A path the user named (config, data set, checkpoint) that does not exist or is not what was asked.

    Still a ``FileNotFoundError``, so callers that catch that keep working.

        >>> isinstance(InputNotFound("data/x: no metadata.json"), FileNotFoundError)
        True
    """
