"""Exceptions that the command line turns into one clear line and exit code 2."""


class CosmolitError(Exception):
    """Base class of every error cosmolit reports to a user without a traceback."""

    exit_code = 2


class UsageError(CosmolitError, ValueError):
    """Bad input from the user: a file, an option or a config value that cannot be used.

    The message names the problem and what is allowed, in one line.
    """
