"""Errors the command line reports as one clear line instead of a traceback."""


class RecError(Exception):
    """Base class: a user-facing problem (bad input, missing data), not a bug."""


class DataError(RecError):
    """A dataset cannot be found, fetched or parsed."""
