"""Errors a user can act on.

A :class:`UserError` is bad input (recipe, data, model, an impossible combination). The CLI
prints its message alone and exits with code 2; ``--debug`` shows the traceback too.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """Something the user asked for that cannot be done, with what would be accepted."""


class RecipeError(UserError):
    """A recipe key or value is wrong."""


class DataError(UserError):
    """A data file or row is malformed."""


class ModelError(UserError):
    """A model cannot be found or loaded."""


class SelectionError(UserError):
    """No backend can run the recipe as written."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


class RunFailed(Exception):
    """A run that started and then failed (a training process died): the CLI prints the
    message and exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
