"""Errors a user can act on. The CLI prints their message as one line and exits non-zero."""


class OptbenchError(Exception):
    """Bad input or an unusable environment; the message says what to do."""

    exit_code = 1


class ConfigError(OptbenchError):
    """A preset, option or hyperparameter that cannot be used."""


class DataError(OptbenchError):
    """A dataset that is missing, corrupt or cannot be fetched."""


class DeviceError(OptbenchError):
    """A device that was asked for but is not there."""


class RecordError(OptbenchError):
    """A run record that cannot be read or written."""
