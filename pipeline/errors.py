"""The one exception type for user mistakes and bad datasets.

The CLI prints a `UserError` as a single line and exits non-zero, without a traceback; anything else is a bug and keeps its
traceback. Messages say what was found, what was expected, and how to fix it.
"""


class UserError(Exception):
    """A problem the user can fix (bad flag, bad path, incompatible or corrupt dataset)."""


class FormatError(UserError):
    """A dataset folder that does not match its manifest or the format specification."""


def run_or_exit(fn, *args, **kwargs):
    """Run a CLI command body: a UserError becomes `error: ...` on stderr and exit code 2, with no traceback."""
    import sys

    try:
        return fn(*args, **kwargs)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
