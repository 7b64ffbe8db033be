"""``python -m train fit --config ...``: a configuration or checkpoint problem ends with its message
alone (the root cause, without the parser's wrapping); ``TRAIN_TRACEBACK=1`` shows the whole trace."""
import os
import sys

from train.cli import main

try:
    main()
except (ValueError, FileNotFoundError) as error:
    if os.environ.get("TRAIN_TRACEBACK"):
        raise
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    sys.exit(f"error: {root}\n(TRAIN_TRACEBACK=1 shows the full trace)")
