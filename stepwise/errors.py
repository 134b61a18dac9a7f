"""Errors that the command line shows as one line, with a non-zero exit and no traceback."""


class StepwiseError(Exception):
    """Base class for user-facing errors: the message is the whole story."""


class ConfigError(StepwiseError, ValueError):
    """A configuration file or override is invalid; the message names the key."""


class CorpusError(StepwiseError):
    """A corpus is missing or unreadable; the message says how to fix it."""
