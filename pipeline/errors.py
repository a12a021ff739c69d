"""User-facing errors of the pipeline stages (the CLI exits 2 on them); each subclasses the built-in a caller expects.

Storage errors (unwritable or foreign directories, corrupt caches) live in ``storage.errors``.
"""


class ConfigError(ValueError):
    """A config file or override is malformed; the message lists every problem.

    ``problems`` holds ``(key, message)`` pairs for checks raised by a config
    section, so an enclosing loader can prefix them with the section's name.
    """

    def __init__(self, message: str, problems: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.problems = problems or []


class DataError(ValueError):
    """The dataset cannot be loaded, tokenized or packed as configured."""


class TeacherError(ValueError):
    """The teacher model or tokenizer cannot be used as configured."""


class CheckpointError(ValueError):
    """A training checkpoint is damaged or cannot be loaded; the message names the file."""
