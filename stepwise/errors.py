"""The one error hierarchy: every failure a user can act on derives from :class:`StepwiseError`.

The command line prints such an error as one line and exits non-zero, with no traceback; the
service maps each kind to one HTTP status (``service.STATUS``). The message is the whole story:
it names the thing (the key, the file, the model id, the request field) and, where it can, says
how to fix it.

=========================  ==========================================================
class                      when
=========================  ==========================================================
``ConfigError``            a config file or ``--set`` override is invalid
``CorpusError``            a corpus is missing or unreadable
``InvalidRequest``         an argument is out of range; ``field`` names it
``ModelNotFound``          no such model id, tag, checkpoint file or export directory
``CheckpointError``        a checkpoint file is there but cannot be read as one
``ExportError``            an export failed a check, or an export directory is unusable
``ExportFormatError``      an export directory written by another exporter version
``RegistryUnavailable``    the ClearML server is unreachable or answers with errors
``DigestMismatch``         a registered version's file differs from the one registered
``DeviceUnavailable``      the device asked for (CUDA) is not there
=========================  ==========================================================
"""

from __future__ import annotations


class StepwiseError(Exception):
    """Base class for user-facing errors: the message is the whole story.

    ``field`` names the request field (or argument) the error is about, when there is one; it
    survives pickling, so the error can cross a process boundary (a worker, a queue).
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ConfigError(StepwiseError, ValueError):
    """A configuration file or override is invalid; the message names the key."""


class CorpusError(StepwiseError):
    """A corpus is missing or unreadable; the message says how to fix it."""


class InvalidRequest(StepwiseError, ValueError):
    """An argument is out of range or inconsistent; ``field`` names it and starts the message."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        if field and not message.startswith(field):
            message = f"{field}: {message}"
        super().__init__(message, field=field)


class ModelNotFound(StepwiseError, LookupError):
    """No registered version has this id or tag, or no checkpoint/export is at this path."""


class CheckpointError(StepwiseError):
    """A checkpoint file is there but is corrupt, truncated or not a stepwise checkpoint."""


class ExportError(StepwiseError):
    """An export failed a check (parity, onnx.checker), or an export directory cannot be loaded."""


class ExportFormatError(ExportError):
    """An export directory written by another version of the exporter."""


class RegistryUnavailable(StepwiseError):
    """The ClearML server (tracking and model registry) cannot be reached or answers with errors."""


class DigestMismatch(StepwiseError):
    """A downloaded version's file does not match the SHA-256 digest recorded when it was registered."""


class DeviceUnavailable(StepwiseError):
    """The device asked for (e.g. CUDA) is not available to this process."""
