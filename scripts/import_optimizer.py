"""``python scripts/import_optimizer.py``: the ``lopt-import`` command (``lopt/cli/import_optimizer.py``),
runnable from a checkout without installing its entry points."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lopt.cli.import_optimizer import run  # noqa: E402

if __name__ == "__main__":
    run()
