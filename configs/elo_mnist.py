"""``configs/elo.py`` on MNIST (ELO Table 1's shape at CPU scale: an MLP task on MNIST).

    python scripts/prepare_data.py --dataset=mnist --source=../shared/data   # once
    python scripts/meta_train.py --config=configs/elo_mnist.py --workdir=runs/elo_mnist

The ELO recipe of ``configs/elo.py`` (truncated ES, replay buffer, behaviour cloning) on one-hidden-layer
ReLU MLPs (20 units, ``mlp_relu``) of MNIST downscaled to 14x14 (as Metz et al. 2019 App. F
evaluate on 14x14 MNIST): 4,150 parameters per instance, a size a 2-core CPU meta-trains in
minutes. Instances differ by their init and a relabelling of the classes.
"""

import importlib.util
import os

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "elo.py")
    spec = importlib.util.spec_from_file_location("configs_elo", path)
    elo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(elo)
    c = elo.get_config()
    c.task = ConfigDict(dict(name="mlp_relu", dataset="mnist", resize=14, hidden_sizes=(20,),
                             batch_size=128, permute_classes=True, init_std=None))
    return c
