"""Metz et al. 2019's recipe at small scale: the per-parameter MLP optimizer meta-trained with
the merged reparameterization + ES gradient and a linearly growing, jittered unroll length.

    python scripts/meta_train.py --config=configs/metz2019.py --workdir=runs/metz2019

L. Metz, N. Maheswaranathan, J. Nixon, C. D. Freeman, J. Sohl-Dickstein, "Understanding and
correcting pathologies in the training of learned optimizers", ICML 2019: Gaussian-smoothed
meta-objective, reparameterization and antithetic ES gradients merged per weight by inverse
empirical variance (Sec. 3, eq. 1); trajectory lengths growing linearly with +-20% jitter
(the paper: 50 -> 10,000); meta-objective on validation loss (``meta_loss.split="valid"``).
Scaled down for a 2-core CPU: digits MLPs, lengths 50 -> 400 over the run.
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    c.num_outer_steps = 500
    c.log_every = 10
    c.checkpoint_every = 100
    c.task = ConfigDict(dict(name="digits_mlp", hidden_sizes=(32,), batch_size=64, permute_classes=True))
    c.lopt = ConfigDict(dict(name="mlp", hidden_size=32, hidden_layers=2))
    c.estimator = ConfigDict(dict(name="merged", std=0.01))
    c.meta_optimizer = ConfigDict(dict(name="adam", learning_rate=1e-3, clip_grad_norm=3.0))
    c.unroll = ConfigDict(
        dict(
            num_particles=8,
            trunc_length=20,
            horizon=ConfigDict(dict(name="linear", start=50, end=400, steps=500, jitter=0.2)),
            meta_loss=ConfigDict(dict(split="valid", normalize="initial", clip=2.0)),
        )
    )
    return c
