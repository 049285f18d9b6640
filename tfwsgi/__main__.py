"""``python -m tfwsgi``: the ``tfwsgi-model-server`` command (tfwsgi/cli.py)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
