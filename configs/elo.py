"""The ELO recipe at small scale: PES + replay buffer + behaviour cloning, on digits MLPs.

    python scripts/meta_train.py --config=configs/elo.py --workdir=runs/elo

The Metz et al. 2019 MLP optimizer meta-trained with PES (Vicol et al. 2021) on one-hidden-
layer MLPs of sklearn's 8x8 digits, with the two ELO training techniques
(``estimators/replay.py``, ``estimators/imitation.py``):

* replay buffer: each particle keeps the last ``capacity`` optimizee states it passed through
  (one enqueued per truncation); an ended trajectory restarts from a uniformly drawn one with
  probability 1 - ``p_threshold``, so truncations of 20 steps see inner steps far past the
  first 20 without unrolling from scratch;
* behaviour cloning: the inner trajectory is Adam's blended into the learned optimizer's,
  theta_{n+1} = theta_n + (1 - a_t) u_Adam + a_t u_LO, and the meta-loss
  (1 - a_t) L_bc + a_t L_task, with a_t rising linearly from 0 to 1 over the first half of
  meta-training.

Sized for a 2-core CPU (minutes). Ablate one technique per command line, e.g.
``--config.unroll.replay.enabled=False`` or ``--config.unroll.behaviour_cloning.enabled=False``;
``configs/naive.py`` is the same run with both off. The ``unroll.replay``,
``unroll.behaviour_cloning`` (and ``unroll.self_improving``, top-level ``imitation``) sections
are read by ``lopt.config.build`` through ``estimators.replay.from_config`` and
``estimators.imitation.*_from_config``.
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
            num_particles=8,  # 4 antithetic pairs
            trunc_length=20,
            horizon=ConfigDict(dict(name="constant", length=200)),
            meta_loss=ConfigDict(dict(split="train", normalize="initial", clip=2.0)),
            replay=ConfigDict(dict(enabled=True, capacity=16, p_threshold=0.5)),
            behaviour_cloning=ConfigDict(
                dict(
                    enabled=True,
                    teacher=ConfigDict(dict(name="adam", learning_rate=1e-2)),
                    # a_t: linear, cosine, step or constant; 0 -> 1 over `steps` outer steps
                    schedule=ConfigDict(dict(kind="linear", steps=300, start=0, levels=1, value=1.0)),
                    normalize="teacher",
                )
            ),
        )
    )
    return c
