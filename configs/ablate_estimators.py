"""Estimator ablation: one experiment, five gradient estimators, the same inner-step budget.

    python scripts/ablate_estimators.py --config=configs/ablate_estimators.py \
        --workdir=runs/ablate_estimators

``get_config()`` is an ordinary experiment config (``lopt.training.train`` accepts it as is): the
per-parameter MLP optimizer of Metz et al. 2019 (here 2 hidden layers of 16 and
learned_optimization's 11 timescales; the paper: 1 layer of 32, 9 timescales) meta-trained on
small digits MLPs with relabelled classes. The ES family's ``std=0.01`` is ours (Metz et al.
2019 smooth with sigma^2 = 0.01, std 0.1). The
ablation script copies it once per estimator, replaces ``config.estimator`` with that
estimator's section from ``get_ablation()`` and sets ``num_outer_steps`` so that every
estimator runs the same number of inner steps (an outer step of ``full_es`` costs
``num_particles * trajectory length`` inner steps, of the truncated estimators
``num_particles * trunc_length``).

``get_ablation()`` holds the settings that are not part of an experiment config (and that
``lopt.config.validate`` would reject there): the estimators and their options, the inner-step
budget and the held-out evaluation.
"""

from ml_collections import ConfigDict

#: Held-out task instance i of the evaluation is drawn from jax.random.PRNGKey(EVAL_SEED_OFFSET + i),
#: far from the keys meta-training derives from ``config.seed``.
EVAL_SEED_OFFSET = 1_000_000


def get_config() -> ConfigDict:
    """The experiment every estimator shares (only ``estimator`` and ``num_outer_steps`` change)."""
    c = ConfigDict()
    c.seed = 0
    c.num_outer_steps = 100  # overwritten per estimator from the inner-step budget
    c.log_every = 1  # full_es takes few outer steps: log each one
    c.checkpoint_every = 50
    c.task = ConfigDict(
        dict(name="digits_mlp", hidden_sizes=(16,), activation="relu", batch_size=32,
             permute_classes=True)
    )
    c.lopt = ConfigDict(dict(name="mlp", hidden_size=16, hidden_layers=2, fused="auto"))
    c.estimator = ConfigDict(dict(name="pes", std=0.01))  # replaced per estimator
    c.meta_optimizer = ConfigDict(dict(name="adam", learning_rate=3e-3, clip_grad_norm=3.0))
    c.unroll = ConfigDict(
        dict(
            num_particles=8,  # 4 antithetic pairs for the ES family
            trunc_length=10,
            horizon=ConfigDict(dict(name="constant", length=100)),
            meta_loss=ConfigDict(dict(split="train", normalize="initial", clip=2.0)),
        )
    )
    return c


def get_ablation() -> ConfigDict:
    """What the ablation varies and how it is measured."""
    a = ConfigDict()
    # Table order (ConfigDict sorts its keys, so the order is kept here).
    a.order = ("tbptt", "es", "pes", "merged", "full_es")
    # One section per estimator; each becomes config.estimator verbatim.
    a.estimators = ConfigDict(
        dict(
            tbptt=ConfigDict(dict(name="tbptt", first_order=False)),
            es=ConfigDict(dict(name="es", std=0.01)),
            pes=ConfigDict(dict(name="pes", std=0.01)),
            merged=ConfigDict(dict(name="merged", std=0.01, first_order=False)),
            full_es=ConfigDict(dict(name="full_es", std=0.01)),
        )
    )
    # Inner steps per estimator (summed over particles). 8 particles x 100-step trajectories,
    # so 24,000 inner steps are 30 full_es outer steps and 300 truncated ones.
    a.inner_steps = 24_000
    # Held-out evaluation: train fresh task instances with the exported optimizer.
    a.eval_steps = 100  # the meta-training horizon
    a.eval_seeds = 8
    a.eval_seed_offset = EVAL_SEED_OFFSET
    return a
