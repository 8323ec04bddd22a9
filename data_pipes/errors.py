"""The one error type for bad input data, so the CLI can print it without a traceback."""

from mlet_torchrec.errors import UserError


class DataError(UserError, ValueError):
    """Bad input data. The message names the file, the row (or row group) and the column."""


class OptionError(UserError, ValueError):
    """A converter or reader option that cannot work (a split that does not sum to 1, an unknown feature
    named by ``--hash-buckets``, flags that exclude each other); the message names the option."""
