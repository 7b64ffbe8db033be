"""One-line errors for every command (``python -m sample``, ``python -m train``, ``stages.convert``, ...).

A problem with what the user gave (a path, a file, a setting, a number) ends the command with
``error: <message>`` on one line of standard error and exit status 2, before a traceback can bury
it. ``WUERSTCHEN_TRACEBACK=1`` (``TRAIN_TRACEBACK=1`` too) re-raises, showing the whole trace.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

TRACEBACK_SWITCH = "WUERSTCHEN_TRACEBACK"
# what bad input raises; a programming error (TypeError, AttributeError, ...) keeps its trace
USER_ERRORS = (ValueError, OSError, FloatingPointError)


def show_traceback() -> bool:
    return bool(os.environ.get(TRACEBACK_SWITCH) or os.environ.get("TRAIN_TRACEBACK"))


def one_line(error: BaseException) -> str:
    """The root cause's message (wrappers such as the config parser's stripped) on a single line."""
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    text = str(root) if not isinstance(root, OSError) or not root.strerror else (
        f"{root.strerror}: {root.filename}" if root.filename else root.strerror)
    return " ".join(text.split()) or type(root).__name__


def run_command(main: Callable[..., object], argv: Sequence[str] | None = None) -> object:
    """``main(argv)``, ending a bad-input error with its one-line message and exit status 2."""
    try:
        return main(argv) if argv is not None else main()
    except USER_ERRORS as error:
        if show_traceback():
            raise
        print(f"error: {one_line(error)} ({TRACEBACK_SWITCH}=1 shows the full trace)", file=sys.stderr)
        raise SystemExit(2) from None
