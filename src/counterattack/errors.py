"""The one exception type for mistakes a user can fix (bad input, missing files, no network)."""


class CounterattackError(Exception):
    """A user-facing error: the command line prints its message, never a traceback."""
