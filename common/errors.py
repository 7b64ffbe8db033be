"""One-line errors for every command (``python -m sample``, ``python -m train``, ``weights.convert``, ...).

A problem with what the user gave (a path, a file, a setting, a number) ends the command with
``error: <message>`` on one line of standard error and exit status 2, before a traceback can bury
it. ``WUERSTCHEN_TRACEBACK=1`` (``TRAIN_TRACEBACK=1`` too) re-raises, showing the whole trace.
A command-line parse error (an unknown flag, a wrong type, a config file's YAML syntax) is the same one
line and a pointer to ``--help``, not the whole usage first.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence

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


def command_name(prog: str) -> str:
    """A parser's name as the user typed the command (``python -m train fit``, not ``__main__.py fit``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    package = spec.name.removesuffix(".__main__") if spec is not None else None
    return prog.replace(" [options]", "").replace("__main__.py", f"python -m {package}" if package else "__main__.py")


@contextlib.contextmanager
def short_parse_errors() -> Iterator[None]:
    """While it lasts, argparse and jsonargparse (LightningCLI) parsers that would print their usage and exit
    print ``error: <message> (see <command> --help)`` on one line and exit with status 2."""
    parsers = [argparse.ArgumentParser]
    if "jsonargparse" in sys.modules:
        parsers.append(sys.modules["jsonargparse"].ArgumentParser)
    originals = {cls: cls.__dict__["error"] for cls in parsers if "error" in cls.__dict__}

    def patched(original):
        def error(parser, message, *args, **kwargs):
            if not getattr(parser, "exit_on_error", True) or show_traceback():  # parsers that raise, not exit
                return original(parser, message, *args, **kwargs)
            print(f"error: {' '.join(str(message).split())} (see {command_name(parser.prog)} --help)", file=sys.stderr)
            raise SystemExit(2)
        return error

    for cls, original in originals.items():
        cls.error = patched(original)
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.error = original


def run_command(main: Callable[..., object], argv: Sequence[str] | None = None) -> object:
    """``main(argv)``, ending a bad-input error with its one-line message and exit status 2."""
    try:
        with short_parse_errors():
            return main(argv) if argv is not None else main()
    except USER_ERRORS as error:
        if show_traceback():
            raise
        print(f"error: {one_line(error)} ({TRACEBACK_SWITCH}=1 shows the full trace)", file=sys.stderr)
        raise SystemExit(2) from None
