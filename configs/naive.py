"""The naive learned-optimizer baseline: ``configs/elo.py`` without its training techniques.

    python scripts/meta_train.py --config=configs/naive.py --workdir=runs/naive

Same task family (digits MLPs), learned optimizer (Metz et al. 2019 MLP), estimator (PES),
particles, truncations, horizon and meta-optimizer as the ELO config, but every trajectory
starts fresh at a reset (no replay buffer), the learned optimizer alone drives the inner
trajectory from the first outer step (no behaviour cloning), no curriculum and no imitation:
the "LO naive" row of the ablation.
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    c.num_outer_steps = 600
    c.log_every = 10
    c.checkpoint_every = 100
    c.task = ConfigDict(
        dict(name="digits_mlp", hidden_sizes=(32,), activation="relu", batch_size=64,
             permute_classes=True)
    )
    c.lopt = ConfigDict(dict(name="mlp", hidden_size=32, hidden_layers=2))
    c.estimator = ConfigDict(dict(name="pes", std=0.01))
    c.meta_optimizer = ConfigDict(dict(name="adam", learning_rate=3e-3, clip_grad_norm=3.0))
    c.unroll = ConfigDict(
        dict(
            num_particles=8,
            trunc_length=20,
            horizon=ConfigDict(dict(name="constant", length=200)),
            meta_loss=ConfigDict(dict(split="train", normalize="initial", clip=2.0)),
        )
    )
    return c
