"""How every hwft entry point runs (the CLI, a bench arm's worker): what a process does first,
and a command run so that a user error or a failed run is one line and its exit code."""

from __future__ import annotations

import sys
from collections.abc import Callable

from hwft.errors import USER_ERROR_EXIT_CODE, RunFailed, UserError
from hwft.storage import access_error


def start_process() -> None:
    """What every hwft process does first (the CLI, a bench arm's worker)."""
    from hwft import library_noise
    from hwft.processes import stop_with_parent

    stop_with_parent()  # a rank or bench arm of a parent hwft process: never outlive it
    library_noise.quiet()  # DeepSpeed's and bitsandbytes' start-up lines stay out of the log


def guarded(command: Callable[[], int], debug: bool = False) -> int:
    """Run a command as every hwft entry point does (the CLI, a bench arm's worker): a user
    error or a failed run is one line on stderr and its exit code; ``debug`` re-raises."""
    try:
        return command()
    except UserError as exc:
        if debug:
            raise
        print(f"hwft: error: {exc}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    except RunFailed as exc:
        print(f"hwft: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("hwft: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a read or write the storage refused that no command explained
        error = access_error(exc)
        if error is None or debug:
            raise
        print(f"hwft: error: {error}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
