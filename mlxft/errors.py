"""Typed errors: library code raises these; the CLI turns them into one clear message."""


class MlxftError(Exception):
    """A user-facing problem: the message says what is wrong and where."""

    exit_code = 2


class ConfigError(MlxftError):
    """A recipe, override or flag is wrong."""


class DataError(MlxftError):
    """A dataset file is missing or malformed."""


class ModelError(MlxftError):
    """A model cannot be found, downloaded, converted or loaded."""


class WriteError(MlxftError, OSError):
    """A file could not be written (a full disk, permissions); the message names the path and what
    is left of it. Also an OSError, so code that handles failed writes keeps handling it."""

    def __init__(self, message: str, path=None, errno: int | None = None):
        super().__init__(message)
        self.path, self.errno = path, errno
