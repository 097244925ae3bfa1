"""The naive learned-optimizer baseline: ``configs/elo.py`` without its training techniques.

    python scripts/meta_train.py --config=configs/naive.py --workdir=runs/naive

Same task family (digits MLPs), learned optimizer (Metz et al. 2019 MLP), estimator (PES),
particles, truncations, horizon and meta-optimizer as the ELO config, but every trajectory
starts fresh at a reset (no replay buffer), the learned optimizer alone drives the inner
trajectory from the first outer step (no behaviour cloning), no curriculum and no imitation:
the "LO naive" row of the ablation.
"""

import importlib.util
import os

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    """``configs/elo.py`` with the replay buffer and behaviour cloning switched off, so the two
    runs can never drift apart in anything but the techniques being ablated."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "elo.py")
    spec = importlib.util.spec_from_file_location("configs_elo", path)
    elo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(elo)
    c = elo.get_config()
    c.unroll.replay.enabled = False
    c.unroll.behaviour_cloning.enabled = False
    return c
