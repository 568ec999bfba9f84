"""The exceptions lorakit raises for bad input.

Every error a user can cause derives from :class:`LorakitError`, so a caller can catch one type.
Messages name what was wrong (the field, file, line, tensor or adapter) and what is allowed.
"""


class LorakitError(Exception):
    """Base class of every error lorakit raises on purpose."""


class ConfigError(LorakitError, ValueError):
    """A configuration value is invalid: the message names the field, the value and what is allowed."""


class TargetError(LorakitError, ValueError):
    """Target modules matched nothing, or matched a layer type lorakit cannot wrap."""


class AdapterError(LorakitError, KeyError):
    """An adapter name is unknown or already taken, or an adapter operation does not apply."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if self.args else ""


class FormatError(LorakitError, ValueError):
    """A file on disk is missing, corrupt, pickled, or does not fit the model it is loaded into."""


class DataError(LorakitError, ValueError):
    """A data file or example is malformed: the message names the file, the line and the problem."""


class ModelError(LorakitError, RuntimeError):
    """A base model cannot be found, converted or loaded."""


class StateError(LorakitError, RuntimeError):
    """An operation does not apply in the current state (e.g. merging while rows use different adapters)."""


class TrainingError(LorakitError, RuntimeError):
    """A training run cannot go on (e.g. the loss became NaN); earlier checkpoints are kept."""
