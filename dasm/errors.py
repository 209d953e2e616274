"""User-facing errors. The CLI prints them as one line and exits with status 2."""


class DasmError(Exception):
    """Bad input: a config value, a dataset, a file. The message names the culprit."""


class ConfigError(DasmError):
    """A configuration key or value is invalid."""


class DataError(DasmError):
    """A dataset cannot be found, read, or is unusable."""


class RunDirError(DasmError):
    """A run directory or one of its files is missing, corrupt or inconsistent."""


class BackendUnavailable(DasmError):
    """A backend that was asked for explicitly cannot run here."""


class UnsavedResult(DasmError):
    """The work is done but its result could not be written; ``result`` holds it, so that it
    is shown (the CLI prints it before the error line) instead of lost."""

    def __init__(self, message: str, result):
        super().__init__(message)
        self.result = result
