"""User-facing errors.

`DiffalignError` is raised for anything the *user* got wrong (bad prompt, missing
checkpoint, out-of-range option). The CLI prints its message on one line and exits with
status 2, without a traceback. Anything else is a bug and keeps its traceback.
"""


class DiffalignError(Exception):
    """An error caused by user input; its message says what was wrong and how to fix it."""


class PromptError(DiffalignError, ValueError):
    """A prompt that the ShapesWorld grammar cannot parse."""


class CheckpointError(DiffalignError):
    """A checkpoint that is missing, corrupt or incompatible."""


class ConfigError(DiffalignError, ValueError):
    """A configuration value or key that is invalid."""


class DatasetError(DiffalignError):
    """A dataset on disk that is missing, corrupt or does not match its index."""
