"""``python -m train fit --config ...``: a configuration, data or checkpoint problem ends with its
one-line message (``common.errors.run_command``); ``WUERSTCHEN_TRACEBACK=1`` shows the whole trace."""
from common.errors import run_command
from train.cli import main

if __name__ == "__main__":
    run_command(main)
