"""Chen et al. 2020's strongest L2O-DM recipe, "DM-CL-IL", at CPU scale.

    python scripts/meta_train.py --config=configs/chen2020_dm_cl_il.py --workdir=runs/dm_cl_il

T. Chen et al., "Training Stronger Baselines for Learning to Optimize", NeurIPS 2020: the
coordinate-wise LSTM (L2O-DM) on ``mlp_orig`` with the unroll-length curriculum (Sec. 3.2,
Algorithm 1; see configs/chen2020_cl.py) *and* off-policy imitation of analytical optimizers
(Sec. 4.1, Algorithm 2): with probability r (``imitation.prob``) an outer step is an imitation
episode that fits the LSTM's updates to those of a teacher drawn uniformly from Adam, SGD and
Adagrad (Sec. 5.3, "off-policy imitation learning (IL) of analytical optimizers (Adam, SGD and
Adagrad)"), along the teacher's own N_train-step trajectory. The paper does not print r; 0.2
is our choice. Ablate with ``--config.imitation.enabled=False`` or
``--config.curriculum.enabled=False``.
"""

import importlib.util
import os

from ml_collections import ConfigDict


def _sibling(name: str):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config() -> ConfigDict:
    c = _sibling("chen2020_cl").get_config()
    c.imitation = ConfigDict(
        dict(enabled=True, prob=0.2, teachers=("adam", "sgd", "adagrad"))
    )
    return c
