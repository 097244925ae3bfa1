"""A small VeLO (``lstm_hidden_size=32, param_inits=8``) meta-trained on the quickstart.

    python scripts/meta_train.py --config=velo_small --workdir=runs/velo_small

``configs/quickstart.py`` (PES on digits MLPs, horizon 200, truncations of 20) with the learned
optimizer swapped for ``velo`` (lopt/velo.py) at reduced sizes: the published VeLO has
``lstm_hidden_size=512, param_inits=256`` (2,320,385 meta-params); this one 14,281. Each inner
trajectory's horizon (200) reaches VeLO as ``num_steps`` and every inner step's training loss as
``value=``. Meta-training from scratch, not the published weights (README, "VeLO"). Override
the sizes on the command line (``--config.lopt.lstm_hidden_size=64``).
"""

import importlib.util
import os

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")
    spec = importlib.util.spec_from_file_location("configs_quickstart", path)
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    c = quickstart.get_config()
    c.lopt = ConfigDict(dict(name="velo", lstm_hidden_size=32, param_inits=8, ff_hidden_size=4,
                             ff_hidden_layers=2))
    return c
