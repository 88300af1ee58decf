"""One line for each foreseeable failure of a command (what ``dcal.cli.main`` prints instead of a traceback).

* An error raised inside a DataLoader worker reaches the main process with the worker's whole traceback in its
  message (torch's ``ExceptionWrapper``): :func:`error_line` keeps the original one-line message.
* A full disk, a quota, a read-only or forbidden folder (``OSError`` ENOSPC, EDQUOT, EROFS, EACCES, EPERM): the
  path and what to do.
* A data-loading worker killed by a signal (often the out-of-memory killer) or gone without a word.
"""

from __future__ import annotations

import errno
import re

from dcal.data.images import printable

OS_ERROR_HINTS = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EROFS: "a read-only file system: write elsewhere",
    errno.EACCES: "check its permissions or use another folder",
    errno.EPERM: "check its permissions or use another folder",
}
_WORKER_TRACEBACK = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")
_WORKER_GONE = re.compile(r"DataLoader worker \(pid")
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*: (.*)$")  # "package.module.SomeError: message"


def worker_message(e: BaseException) -> str:
    """``str(e)``, or for an exception re-raised from a DataLoader worker the worker's own message (the last line
    of the traceback torch puts in front of it, without its type)."""
    text = str(e)
    if not _WORKER_TRACEBACK.match(text):
        return text
    last = [line for line in text.splitlines() if line.strip()][-1].strip()
    m = _EXCEPTION_LINE.match(last)
    return m.group(1) if m else last


def error_line(e: BaseException) -> str | None:
    """The one line to print for ``e``, or None when it is not a foreseeable failure (a bug: keep the traceback).

    ``OSError`` and ``RuntimeError`` are foreseeable only for the cases of the module doc (a missing file is the
    caller's user error and keeps its message); any other exception type gets its message, worker tracebacks cut.
    """
    if isinstance(e, (FileNotFoundError, FileExistsError)):
        return worker_message(e)
    if isinstance(e, OSError):
        hint = OS_ERROR_HINTS.get(e.errno)  # type: ignore[arg-type]
        if hint is None:
            return None
        where = f"{printable(e.filename)}: " if e.filename is not None else ""
        return f"{where}{e.strerror} ({hint})"
    if isinstance(e, RuntimeError):
        text = str(e)
        if _WORKER_TRACEBACK.match(text) or not _WORKER_GONE.search(text):
            return None
        first = text.strip().splitlines()[0].strip().rstrip(".")
        return (f"{first}: a data-loading worker died (often the out-of-memory killer, or too little shared memory "
                "in /dev/shm); use fewer workers (train.workers / --workers) or a smaller batch")
    return worker_message(e)
