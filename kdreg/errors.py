"""Errors that reach the user as messages (exit code 2), never as tracebacks."""

from __future__ import annotations

from collections.abc import Iterable


class KdregError(Exception):
    """Base of kdreg's user-facing errors."""


class UserError(KdregError):
    """Bad input from the user: a recipe, a command line, a data folder, a checkpoint.

    ``problems`` holds one line per problem; ``str()`` joins them.
    """

    def __init__(self, problems: str | Iterable[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class RecipeError(UserError):
    """The recipe is wrong; every line names a key path (``what @ recipe.path``)."""


class PluginError(UserError):
    """A plugin is broken or two plugins claim the same name."""


class DataError(UserError):
    """A data folder or file is missing or malformed."""


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable or does not fit the model."""


class ExportError(UserError):
    """A sub-model cannot be exported as a standalone network (``kdreg export``)."""


class OptionError(ValueError):
    """A plugin factory rejects one of its options.

    ``key`` names the option (``widths``); the recipe layer turns it into a full key path.
    """

    def __init__(self, message: str, key: str | None = None):
        self.key = key
        super().__init__(message)
