"""The one error type for bad input data, so the CLI can print it without a traceback."""


class DataError(ValueError):
    """Bad input data. The message names the file, the row (or row group) and the column."""
