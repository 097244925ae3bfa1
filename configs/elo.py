"""The ELO recipe at CPU scale: truncated ES + replay buffer + online behaviour cloning, on digits MLPs.

    python scripts/meta_train.py --config=configs/elo.py --workdir=runs/elo

ELO: Efficient Long-horizon Learning of learned optimizers, Algorithm 1, with the per-parameter
MLP optimizer of Metz et al. 2019 (App. D.1; here with 2 hidden layers and learned_optimization's
11 timescales, where the paper has 1 layer and 9) meta-trained by antithetic truncated ES:

* ``estimator``: ``es``. Every segment starts restored or fresh, so nothing persists between
  truncations for PES to correct: PES over the buffer is truncated ES (``estimators/pes.py``
  refuses it). ``configs/naive.py`` uses the same estimator, so the ELO-vs-naive comparison
  changes the techniques only.
* ``unroll.replay`` (``estimators.resets.ELOReplay``): every outer step each particle runs a
  segment of N = ``trunc_length`` inner steps, starting from a state drawn uniformly from the
  buffer B of M = ``capacity`` states when u > P_th = ``p_threshold`` (and t > 0), else from a
  fresh task instance; one state per segment (after a uniform 1..N-1 of its updates) is
  enqueued FIFO. Chains of segments reach positions far beyond N; ``unroll.horizon`` caps a
  chain's position (here 10 N, the "10x the meta-training horizon" ELO evaluates at).
* ``unroll.behaviour_cloning`` (``lopt.wrappers.BehaviourCloning``): the inner trajectory is
  Adam's fused with the learned optimizer's, theta_{n+1} = theta_n + (1 - a_t) u_Adam +
  a_t u_LO, and the meta-loss (1 - a_t) L_bc + a_t L_task, a_t rising linearly from 0 to 1 over
  the first half of meta-training (on the run's clock).

What ELO does not specify and we chose: M = 64, P_th = 0.2 (a segment restores with
probability 0.8, so a chain runs 1 / P_th = 5 segments on average, each adding about N / 2
positions, and the longest chains reach the cap 10 N), Adam's learning rate 1e-2 (tuned
for these tasks), the ramp's length, and the task-term normalisation (each term divided by the
trajectory's initial loss, clipped at 2, so task instances weigh alike). CPU scale: one-hidden-
layer MLPs on 8x8 digits with relabelled classes, 8 particles (4 antithetic pairs), N = 20;
ELO's tasks are MLP/ResNet-18 on ImageNet 32x32 and GPT-2 mini.

``eval`` runs the meta-params on held-out instances at N and 10 N every 50 outer steps
(``eval/...`` rows in metrics.jsonl, ``plots/eval.png``): the meta-loss of a buffer run scores
positions up to 10 N and cannot be compared with the naive run's; this can.

``configs/naive.py`` is the "LO naive" row of ELO's Table 1: the same N-step segments, each one a
fresh trajectory of exactly N steps (horizon N, no stagger, no buffer), no behaviour cloning.
Ablate one technique per command line, e.g. ``--config.unroll.replay.enabled=False`` or ``--config.unroll.behaviour_cloning.enabled=False``.
"""

from ml_collections import ConfigDict

from lopt.training.config import tuple_ref


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    c.num_outer_steps = 600
    c.log_every = 10
    c.checkpoint_every = 100
    c.checkpoint_keep = 2  # the newest checkpoints, and every 300th step (lopt-export --step=300)
    c.checkpoint_keep_every = 300
    c.task = ConfigDict(
        dict(name="digits_mlp", hidden_sizes=(32,), activation="relu", batch_size=64,
             permute_classes=True)
    )
    c.lopt = ConfigDict(dict(name="mlp", hidden_size=32, hidden_layers=2, fused="auto"))
    c.estimator = ConfigDict(dict(name="es", std=0.01))  # ours: sigma = 0.01 (Metz 2019: sigma^2 = 0.01)
    c.meta_optimizer = ConfigDict(dict(name="adam", learning_rate=3e-3, clip_grad_norm=3.0))
    c.unroll = ConfigDict(dict(num_particles=8, trunc_length=20))  # 4 antithetic pairs; N = 20
    # Values derived from others are references, resolved when read: after command-line
    # overrides, so --config.unroll.trunc_length=50 caps chains at 500 and a shorter
    # --config.num_outer_steps shortens the ramp. Overriding a derived value itself still works.
    n = c.unroll.get_ref("trunc_length")
    c.unroll.horizon = ConfigDict(dict(name="constant", length=10 * n))  # caps a chain's position: 10 N
    c.unroll.meta_loss = ConfigDict(dict(split="train", normalize="initial", clip=2.0))
    c.unroll.replay = ConfigDict(dict(enabled=True, capacity=64, p_threshold=0.2))
    c.unroll.behaviour_cloning = ConfigDict(
        dict(
            enabled=True,
            teacher=ConfigDict(dict(name="adam", learning_rate=1e-2)),
            # a_t: linear, cosine, step or constant; 0 -> 1 over `steps` outer steps, here the
            # first half of meta-training
            schedule=ConfigDict(dict(kind="linear", steps=c.get_ref("num_outer_steps") // 2, start=0,
                                     levels=1, value=1.0)),
        )
    )
    # Held-out evaluation during meta-training (lopt.training.continuous_eval): the meta-params
    # train 8 fresh instances of the training task for H = N and 10 N steps (ELO Table 1's 1x
    # and 10x horizon) every 50 outer steps, against Adam tuned once at the start.
    c.eval = ConfigDict(dict(enabled=True, every=50, lengths=tuple_ref(n, 10 * n), seeds=8,
                             tasks=None, baseline="adam"))
    return c
