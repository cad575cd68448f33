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


class CheckpointWriteError(KdregError):
    """A checkpoint could not be written (a full disk, a file-size limit): the run stops (exit
    code 1) with the previous checkpoint intact."""


class Checkpointed(Exception):  # noqa: N818 - an outcome, not a failure
    """The run saved its checkpoint and stopped on request (a signal), to be resumed by running
    the same command again: exit code :data:`EXIT_RESUME`."""


#: ``kdreg run``'s exit code after :class:`Checkpointed`: "checkpointed, resume me" (EX_TEMPFAIL
#: of sysexits.h, which schedulers and shells read as "try again")
EXIT_RESUME = 75


class ExportError(UserError):
    """A sub-model cannot be exported as a standalone network (``kdreg export``)."""


class OptionError(ValueError):
    """A plugin factory rejects one of its options.

    ``key`` names the option (``widths``); the recipe layer turns it into a full key path. A
    factory that finds several problems at once raises the first with the others in ``more``
    (:meth:`raise_any` does): each becomes a line of its own.
    """

    def __init__(self, message: str, key: str | None = None, *, more: Iterable[OptionError] = ()):
        self.key = key
        self.more = tuple(more)
        super().__init__(message)

    def each(self) -> list[OptionError]:
        """This problem and the others raised with it."""
        return [self, *self.more]

    @classmethod
    def raise_any(cls, errors: Iterable[OptionError]) -> None:
        """Raise ``errors`` together (the first, the others in ``more``), if there is any."""
        found = list(errors)
        if found:
            raise cls(str(found[0]), found[0].key, more=found[1:])
