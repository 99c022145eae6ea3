"""A write that the storage refused (no space, a quota, a read-only file system, no permission):
one message naming what was being written, why, and what to do.

Python raises these as ``OSError`` with an errno; the Rust writers of safetensors and tokenizers
raise plain exceptions whose text ends in ``(os error 28)``; MLX's writer says only
``[write] Unable to write N bytes``, so its folder is asked (``statvfs``) what went wrong.
:func:`failed_write` recognises all three; everything else is not a storage error and is left
alone. A run adds where it stands (:meth:`hwft.output.RunDir.writing`): the last complete
checkpoint, which such a failure never touches, and the command that continues from it.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hwft.errors import UserError

#: errno -> (what happened, what to do about it).
STORAGE_ERRNOS = {
    errno.ENOSPC: ("no space left on the device", "free space on that disk"),
    errno.EDQUOT: ("the disk quota is exhausted", "free space within your quota"),
    errno.EFBIG: ("the file is larger than the file system allows", "move the folder to a file system that allows it"),
    errno.EROFS: ("the file system is read-only", "make that file system writable"),
    errno.EACCES: ("permission denied", "give yourself write permission there"),
    errno.EPERM: ("the operation is not permitted", "give yourself write permission there"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "move the file that stands where a folder should"),
    errno.EISDIR: ("the path is a folder, not a file", "move the folder that stands where a file should"),
    errno.ENAMETOOLONG: ("the path is too long for the file system", "choose a shorter path"),
}
#: How libraries that drop the errno word it.
RUST_IO = re.compile(r"\(os error (\d+)\)")
STRERRORS = {os.strerror(code): code for code in STORAGE_ERRNOS}
OPAQUE_WRITE = re.compile(r"^\[(write|save_safetensors|save|save_gguf)\] ")


class StorageError(UserError):
    """The storage refused a write (a UserError: the user frees space or fixes the folder)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.errno = code


@dataclass(frozen=True)
class FailedWrite:
    errno: int
    path: str | None  #: the file or folder, where the error names it

    @property
    def reason(self) -> str:
        return STORAGE_ERRNOS[self.errno][0]

    @property
    def fix(self) -> str:
        return STORAGE_ERRNOS[self.errno][1]


def failed_write(exc: BaseException, folder: Path | None = None) -> FailedWrite | None:
    """The storage error ``exc`` is, if it is one (``folder``: where the write went, asked when
    the library's message names no cause)."""
    if isinstance(exc, StorageError):
        return None  # already explained
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        return FailedWrite(exc.errno, exc.filename)
    if isinstance(exc, OSError | RuntimeError) or type(exc).__name__ in ("SafetensorError", "Exception"):
        text = str(exc)
        match = RUST_IO.search(text)
        if match and int(match[1]) in STORAGE_ERRNOS:
            return FailedWrite(int(match[1]), None)
        for words, code in STRERRORS.items():
            if words in text:
                return FailedWrite(code, None)
        if folder is not None and OPAQUE_WRITE.match(text):
            code = _diagnose(folder)
            if code is not None:
                return FailedWrite(code, None)
    return None


def _diagnose(folder: Path) -> int | None:
    """Why a write into ``folder`` (or its nearest existing parent) could have failed."""
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        stat = os.statvfs(path)
    except OSError:
        return None
    if stat.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if stat.f_bavail * stat.f_frsize < 2**20:
        return errno.ENOSPC
    if not os.access(path, os.W_OK):
        return errno.EACCES
    return None


def storage_error(
    exc: BaseException, what: str, folder: Path | None = None, advise: Callable[[FailedWrite], str] | None = None
) -> StorageError | None:
    """The one-line StorageError for ``exc`` while writing ``what``, or None if ``exc`` is not a
    storage error. ``advise``: what to say after the cause (where a run stands and how to go
    on); by default the fix alone."""
    found = failed_write(exc, folder)
    if found is None:
        return None
    where = f" ({found.path})" if found.path and str(found.path) not in what else ""
    after = advise(found) if advise else found.fix[0].upper() + found.fix[1:]
    return StorageError(f"cannot write {what}: {found.reason}{where}. {after}", found.errno)


def access_error(exc: BaseException) -> UserError | None:
    """The last resort of every command (hwft.cli): a storage error nothing more specific caught,
    reading or writing, as one line naming the path."""
    found = failed_write(exc)
    if found is None:
        return None
    return StorageError(
        f"{found.path or 'a file'}: {found.reason}. {found.fix[0].upper() + found.fix[1:]}", found.errno
    )
