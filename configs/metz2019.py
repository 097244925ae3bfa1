"""Metz et al. 2019's recipe at CPU scale: the per-parameter MLP optimizer meta-trained with the
merged reparameterization + ES gradient, a linearly growing, jittered number of inner steps per
truncation, and the validation meta-objective.

    python scripts/meta_train.py --config=configs/metz2019.py --workdir=runs/metz2019

L. Metz, N. Maheswaranathan, J. Nixon, C. D. Freeman, J. Sohl-Dickstein, "Understanding and
correcting pathologies in the training of learned optimizers", ICML 2019. What each line takes
from the paper, and where CPU scale forces a smaller number:

* ``estimator``: Sec. 3, the Gaussian-smoothed objective "sigma^2 is a fixed variance (set to
  0.01 in all experiments)", so ``std=0.1``; reparameterization and antithetic ES gradients
  merged per weight by inverse empirical variance (eq. 1, App. C), "the same samples for both".
* ``lopt``: App. D.1, "a single hidden layer feed forward MLP with 32 hidden units", momenta at
  (0.5, 0.9, 0.99, 0.999, 0.9999), gradient and weight, "9 timescales logarithmicly spaced from
  (3, 300k)" (``timescales="metz2019"``), outputs exp(1e-3 o1) 1e-3 o2.
* ``unroll.trunc_schedule``: Sec. 4.3 / App. C-D.3, the number of inner steps *per truncation*
  grows linearly ("from 50 - 10k over the course of 5k outer-training iterations") with +-20%
  uniform jitter. CPU scale: 10 -> 100 over the run (``trunc_length`` = the largest,
  ceil(100 x 1.2)); one length per outer step for all particles (the paper drew one per worker).
* ``unroll.horizon``: the inner problem is trained for 10k steps in the paper (App. J.1: "outer-
  trained using 10k inner-iterations"); CPU scale: 400-step trajectories cut into truncations.
* ``unroll.meta_loss``: L_valid (Figure 1), the plain mean of the validation loss after each
  update over the truncation; no normalisation, no clip (the paper has neither).
* ``meta_optimizer``: App. D.3, Adam "with a learning rate of 0.003 for the training outer-
  objective and 0.0003 for the validation outer-objective, and beta1 = 0.5"; no gradient clip.
* ``num_particles``: the paper averaged "a batch of 128" samples per update from 128 CPU
  workers (Sec. 4.3, App. D.3); CPU scale: 16 antithetic pairs (32 particles), enough for the
  per-element variances of eq. 1 to carry information (15 degrees of freedom).
* ``task``: the paper's three-layer conv nets on 10-class subsets of ImageNet 32x32 (Sec. 4.2)
  are out of reach on a CPU; a one-hidden-layer MLP on 8x8 digits with relabelled classes
  stands in (``--config.task.name=metz_conv --config.task.dataset=imagenet_resized/32x32`` is
  the paper's, given the prepared dataset).
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    c.num_outer_steps = 500
    c.log_every = 10
    c.checkpoint_every = 100
    c.task = ConfigDict(
        dict(name="digits_mlp", hidden_sizes=(32,), activation="relu", batch_size=64,
             permute_classes=True)
    )
    c.lopt = ConfigDict(dict(name="mlp", hidden_size=32, hidden_layers=1, timescales="metz2019",
                             fused="auto"))
    c.estimator = ConfigDict(dict(name="merged", std=0.1))
    c.meta_optimizer = ConfigDict(dict(name="adam", learning_rate=3e-4, b1=0.5))
    c.unroll = ConfigDict(
        dict(
            num_particles=32,  # 16 antithetic pairs
            trunc_length=120,  # the largest truncation the schedule draws: ceil(100 * 1.2)
            trunc_schedule=ConfigDict(dict(name="linear", start=10, end=100, steps=500, jitter=0.2)),
            horizon=ConfigDict(dict(name="constant", length=400)),
            meta_loss=ConfigDict(dict(split="valid", normalize="none", clip=None)),
        )
    )
    return c
