"""Chen et al. 2020's strongest L2O-DM recipe, "DM-CL-IL", at CPU scale.

    python scripts/meta_train.py --config=configs/chen2020_dm_cl_il.py --workdir=runs/dm_cl_il

T. Chen et al., "Training Stronger Baselines for Learning to Optimize", NeurIPS 2020: the
coordinate-wise LSTM (L2O-DM) on ``mlp_orig`` with the unroll-length curriculum (Sec. 3.2,
Algorithm 1; see configs/chen2020_cl.py) *and* off-policy imitation of analytical optimizers
(Sec. 4.1, Algorithm 2, ``estimators/imitation.py``): at the start of each epoch (one N_train-step
trajectory, ceil(N_train / trunc_length) outer steps) a coin with probability r decides whether
the epoch is an imitation episode, which fits the LSTM's updates to those of a teacher drawn
uniformly from Adam, SGD and Adagrad (Sec. 5.3) along the teacher's own trajectory, one
meta-update per truncation, with its own Adam state.

What the paper leaves open and where each value comes from:

* ``imitation.prob``: r per curriculum stage, the released code's ``mt_ratios`` "0.0 0.1 0.3
  0.3 ..." (``train_dm.py``): stage 0 never imitates, stage 1 one epoch in ten, later stages
  three in ten.
* ``imitation.teachers``: the paper's three (Sec. 5.3; the code's default is Adam alone, at
  0.01). Learning rates chosen so each makes progress within N_train on this task (mlp_orig,
  sigmoid, init std 0.01, where gradients are small): the best of a grid at every N_train >= 40,
  on MNIST 14x14 and on the 8x8 digits alike (training loss after 40 / 160 steps, 8 instances,
  MNIST 14x14): Adam 0.03 (1.05 / 0.26; the code's 0.01: 1.76 / 0.47), SGD 3.0 (1.91 / 0.41;
  our default 0.1 stays at ln 10 = 2.30 for 160 steps), Adagrad 1.0 (1.89 / 0.40; 0.1 stays
  at 2.26). Grids: Adam 1e-3..0.1, SGD 0.1..10, Adagrad 0.01..1 (half-decades).
* the loss is eq. (1)'s raw squared error (the imitation's own Adam state makes its scale
  irrelevant; the code's 0.5 / num_params factor changes nothing either).

Ablate with ``--config.imitation.enabled=False`` (CL alone) or
``--config.curriculum.enabled=False`` (IL alone: then give one r, e.g.
``--config.imitation.prob=0.3``, the code's ``mt_ratio`` default).
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
        dict(
            enabled=True,
            prob=(0.0, 0.1, 0.3),  # r per curriculum stage (the last repeats): the code's mt_ratios
            teachers=(
                dict(name="adam", learning_rate=0.03),
                dict(name="sgd", learning_rate=3.0),
                dict(name="adagrad", learning_rate=1.0),
            ),
        )
    )
    return c
