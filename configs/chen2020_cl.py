"""Chen et al. 2020's unroll-length curriculum ("L2O-DM-CL") at CPU scale.

    python scripts/meta_train.py --config=configs/chen2020_cl.py --workdir=runs/chen2020_cl

T. Chen, W. Zhang, J. Zhou, S. Chang, S. Liu, L. Amini, Z. Wang, "Training Stronger Baselines
for Learning to Optimize", NeurIPS 2020. What each line takes from the paper:

* ``lopt``: L2O-DM, the coordinate-wise LSTM of Andrychowicz et al. 2016 (Sec. 5, "Optimizer
  Settings"), as DeepMind's released code configures it (``lopt/rnn.py``).
* ``estimator``: truncated BPTT, first order as in L2O-DM (Andrychowicz et al. drop the
  second derivatives); "The unroll length is fixed to 20" (Sec. 5): ``trunc_length=20``.
* ``meta_optimizer``: "L2O-DM [1] and RNNprop [7] are optimized by Adam with an initial
  learning rate of 1e-3" (Sec. 5); no gradient clip.
* ``unroll.meta_loss``: L_f(phi) = sum_t w_t f(theta_t) (Sec. 3) on the training loss, here
  with w_t = 1/T (the mean; Adam is invariant to the constant factor); no normalisation, clip.
* ``task``: ``mlp_orig``, "a simple Multi-layer Perceptron (MLP) with one hidden layer of 20
  dimensions and the sigmoid activation function on the MNIST dataset", batch 128, "parameters
  initialized by a random normal distribution of standard deviation of 0.01" (Sec. 5).
  CPU scale: the embedded 8x8 digits with relabelled classes (``dataset="digits"``); the
  paper's MNIST is ``--config.task.dataset=mnist`` once prepared.
* ``curriculum``: Algorithm 1 (``lopt/curriculum.py``): N_train grows through ``stages`` (the
  paper: 100, 200, 500, 1000, ...), each stage validated at the next stage's length every
  ``period`` epochs (an epoch: one N_train-step trajectory per particle), at least
  ``min_periods`` (N_period) periods per stage, then on while the latest period is the stage's
  best. CPU scale: stages (20, 40, 80, 160), T_period = 5 epochs, N_period = 2. No
  ``max_periods`` (our extension; the paper has none).

Turn the curriculum off for the ablation with ``--config.curriculum.enabled=False`` (training
then uses ``unroll.horizon``, the last stage's length).
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    c.num_outer_steps = 1000  # a budget; the curriculum usually stops earlier
    c.log_every = 10
    c.checkpoint_every = 50
    c.task = ConfigDict(
        dict(name="mlp_orig", dataset="digits", batch_size=128, permute_classes=True,
             init_std=0.01)
    )
    c.lopt = ConfigDict(dict(name="lstm_dm"))  # 2 x 20 LSTM, LogAndSign k=5, output x 0.01
    c.estimator = ConfigDict(dict(name="tbptt", first_order=True))
    c.meta_optimizer = ConfigDict(dict(name="adam", learning_rate=1e-3))
    c.unroll = ConfigDict(
        dict(
            num_particles=8,
            trunc_length=20,
            # Used only with the curriculum disabled: each stage sets constant(N_train).
            horizon=ConfigDict(dict(name="constant", length=160)),
            meta_loss=ConfigDict(dict(split="train", normalize="none", clip=None)),
        )
    )
    c.curriculum = ConfigDict(
        dict(
            enabled=True,
            stages=(20, 40, 80, 160),  # N_train; a stage validates at the next one (N_valid)
            period=5,  # T_period, epochs (one N_train-step trajectory per particle) per period
            min_periods=2,  # N_period
            max_periods=None,  # our extension, off: Algorithm 1 has no cap
            valid_seeds=8,  # held-out task instances per validation
            valid_metric="final_train_loss",
            restart_from_best=True,
        )
    )
    return c
