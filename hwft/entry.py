"""How every hwft entry point runs (the CLI, a bench arm's worker): what a process does first,
and a command run so that a user error or a failed run is one line and its exit code."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from hwft.errors import USER_ERROR_EXIT_CODE, RunFailed, UserError
from hwft.storage import access_error


def start_process() -> None:
    """What every hwft process does first (the CLI, a bench arm's worker)."""
    from hwft import library_noise
    from hwft.processes import stop_with_parent

    stop_with_parent()  # a rank or bench arm of a parent hwft process: never outlive it
    library_noise.quiet()  # DeepSpeed's and bitsandbytes' start-up lines stay out of the log


def leave_out_unneeded_imports(recipe) -> None:
    """In a process of its own that trains one recipe (not a caller's: the tests run many in
    one), bitsandbytes stays unimported where the recipe does not quantise. peft imports it
    whenever it is installed (``peft.helpers``), and bitsandbytes' import compiles its kernels'
    wrappers with torch.compile, which imports Inductor: about 1 s of every start. ``None`` in
    ``sys.modules`` is Python's own mark of a module that cannot be imported, so peft and
    transformers see no bitsandbytes here, as on a machine without it."""
    if recipe.method.tuning == "qlora" or "bitsandbytes" in sys.modules or "peft" in sys.modules:
        return
    sys.modules["bitsandbytes"] = None  # pyright: ignore[reportArgumentType]


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
    except BrokenPipeError:  # `hwft env | head`: the caller says nothing more
        raise
    except Exception as exc:
        if debug:
            raise
        error = access_error(exc)  # a read or write the storage refused that no command explained
        if error is not None:
            print(f"hwft: error: {error}", file=sys.stderr)
            return USER_ERROR_EXIT_CODE
        if os.environ.get("HWFT_TRACEBACKS") == "1":
            traceback.print_exc()
        print(f"hwft: error: {failure(exc)}", file=sys.stderr)
        return FAILURE_EXIT_CODE


#: The exit code of a failure that is not the user's (a library's exception hwft did not expect).
FAILURE_EXIT_CODE = 1


def failure(exc: BaseException) -> str:
    """One line for an exception no part of hwft explained: what it is, where it was raised (the
    module and line of the deepest frame, usually a library's), and how to see the rest.

    ``--debug`` re-raises it with its traceback; ``HWFT_TRACEBACKS=1`` prints the traceback
    before this line (the test suite sets it, so a failing test shows where)."""
    message = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {message[0]}" if message else type(exc).__name__
    frames = traceback.extract_tb(exc.__traceback__)
    where = ""
    if frames:
        last = frames[-1]
        parts = Path(last.filename).parts
        cut = next((i for i in range(len(parts) - 1, -1, -1) if parts[i] in ("site-packages", "dist-packages")), None)
        shown = "/".join(parts[cut + 1 :]) if cut is not None else "/".join(parts[-3:])
        where = f" (raised in {shown}:{last.lineno})"
    return (
        f"an unexpected failure, not a problem hwft found in your input: {text[:400]}{where}; "
        "--debug shows the traceback"
    )
