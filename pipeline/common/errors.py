"""The one exception type for user mistakes and bad datasets, and the one place that turns failures into one line.

The CLI prints a `UserError` as a single line and exits non-zero, without a traceback; so are the operating-system
failures a user fixes (disk full, read-only or forbidden folder, a file where a folder was expected). Anything else is
a bug and keeps its traceback. Messages say what was found, what was expected, and how to fix it.
"""

from __future__ import annotations

import errno

# errno values a user can fix, with what to tell them.
_OS_FIXES = {
    errno.ENOSPC: "no space left on the disk; free space or write to another disk",
    errno.EDQUOT: "the disk quota is exhausted; free space or write to another disk",
    errno.EFBIG: "the file grew past the size limit of the disk or the process (ulimit -f); free space, raise the "
                 "limit or write to another disk",
    errno.EROFS: "the folder is on a read-only filesystem; choose a writable folder",
    errno.EACCES: "permission denied; choose a folder you may write to, or fix its permissions",
    errno.EPERM: "operation not permitted; choose a folder you may write to, or fix its permissions",
    errno.ENOTDIR: "a path component is a file where a folder was expected; choose another path",
    errno.EISDIR: "a folder is where a file was expected; choose another path",
}
# Text of failures that libraries report without an errno (torch.save, pyarrow, safetensors).
_DISK_TEXT = ("no space left", "file too large", "disk quota", "file write failed", "failed writing file", "storagefull",
              "filetoolarge", "quotaexceeded")


class UserError(Exception):
    """A problem the user can fix (bad flag, bad path, incompatible or corrupt dataset)."""


class FormatError(UserError):
    """A dataset folder that does not match its manifest or the format specification."""


def describe(e: BaseException, limit: int = 200) -> str:
    """`TypeName: first non-empty line of the message`, for quoting an exception inside a UserError. Never raises:
    an exception with an empty message, or one whose `__str__` itself fails, must not replace the error being reported."""
    try:
        text = str(e)
    except Exception:  # a broken __str__ in a third-party exception
        text = ""
    line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    return f"{type(e).__name__}: {line[:limit]}" if line else type(e).__name__


def os_problem(e: BaseException) -> str | None:
    """One line for a failure the user can fix in their environment (found anywhere in the exception's chain), or None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _OS_FIXES:
            where = f" {e.filename}" if getattr(e, "filename", None) else ""
            verb = "write" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS) else "access"
            return f"cannot {verb}{where}: {_OS_FIXES[e.errno]}"
        try:
            text = str(e).lower()
        except Exception:
            text = ""
        if any(t in text for t in _DISK_TEXT):
            return (f"writing failed ({describe(e)}): the disk is full or a file size limit was reached; free space, "
                    "raise the limit or write to another disk")
        e = e.__cause__ or e.__context__
    return None


def run_or_exit(fn, *args, **kwargs):
    """Run a CLI command body: a UserError, or an OS failure the user can fix (disk full, read-only folder, ...),
    becomes `error: ...` on stderr and exit code 2, with no traceback. Other exceptions are bugs and keep theirs."""
    import signal
    import sys
    import threading

    if hasattr(signal, "SIGXFSZ") and threading.current_thread() is threading.main_thread():
        # past a file-size limit (ulimit -f) a write fails with EFBIG and is reported below, instead of a silent kill
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        try:
            message = " ".join(str(e).split())  # one line, whatever the message held
        except Exception:
            message = ""
        print(f"error: {message or type(e).__name__}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        problem = os_problem(e)
        if problem is None:
            raise
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
