"""Meta-train a learned optimizer from a config file.

    python scripts/meta_train.py --config=configs/quickstart.py --workdir=runs/quickstart \
        --config.estimator.std=0.01

Rerunning with the same workdir resumes from the latest checkpoint. Outputs: config.json,
metrics.jsonl, checkpoints/, export/optimizer.lopt and plots/meta_loss.png in the workdir.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lopt import outer  # noqa: E402
from tasks.registry import ConfigError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/quickstart.py", "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/quickstart", "Directory for outputs and checkpoints.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    config = _CONFIG.value
    try:
        summary = outer.train(config, _WORKDIR.value, progress=_PROGRESS.value)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    m = summary["last_metrics"]
    rate = summary["inner_steps_per_sec"]
    print(f"done: outer step {m.get('step')}, meta-loss {m.get('meta_loss', float('nan')):.4f}, "
          f"{rate:,.0f} inner steps/s" if rate else "done")
    print(f"  workdir:    {summary['workdir']}")
    print(f"  metrics:    {summary['metrics']}")
    print(f"  checkpoint: {summary['checkpoints']}")
    print(f"  export:     {summary['export']}")
    print(f"  plot:       {summary['plot']}")
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
