"""``python scripts/export.py``: the ``lopt-export`` command (``lopt/cli/export.py``), runnable from a checkout
without installing its entry points."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lopt.cli.export import run  # noqa: E402

if __name__ == "__main__":
    run()
