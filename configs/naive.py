"""The naive learned-optimizer baseline, ELO's "LO (naive)": ``configs/elo.py`` without its
training techniques.

    python scripts/meta_train.py --config=configs/naive.py --workdir=runs/naive

Same task family (digits MLPs), learned optimizer (the per-parameter MLP), estimator (truncated
ES), particles, segment length N and meta-optimizer as the ELO config, but every segment is a
fresh trajectory of exactly N steps (``horizon`` = ``trunc_length`` and ``stagger=False``, so
no trajectory straddles two truncations; no replay buffer) and the learned optimizer alone
drives it from the first outer step (no behaviour cloning): the meta-training horizon is H = N,
as in ELO's Table 1.
"""

import importlib.util
import os

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    """``configs/elo.py`` with the replay buffer and behaviour cloning switched off and every
    trajectory one segment long, so the two runs can never drift apart in anything but the
    techniques being ablated."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "elo.py")
    spec = importlib.util.spec_from_file_location("configs_elo", path)
    elo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(elo)
    c = elo.get_config()
    c.unroll.replay.enabled = False
    c.unroll.behaviour_cloning.enabled = False
    c.unroll.horizon.length = c.unroll.get_oneway_ref("trunc_length")  # H = N after overrides too
    c.unroll.stagger = False  # the first trajectories too are N steps, aligned with truncations
    return c
