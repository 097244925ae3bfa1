"""Chen et al. 2020's unroll-length curriculum ("L2O-DM-CL"), at small scale.

    python scripts/meta_train.py --config=configs/chen2020_cl.py --workdir=runs/chen2020_cl

T. Chen, W. Zhang, J. Zhou, S. Chang, S. Liu, L. Amini, Z. Wang, "Training Stronger Baselines
for Learning to Optimize", NeurIPS 2020, Sec. 3.1 / Algorithm 1: the L2O-DM coordinate-wise
LSTM (Andrychowicz et al. 2016) meta-trained by truncated BPTT (first order, as L2O-DM) on the
one-hidden-layer sigmoid MLP ``mlp_orig``, with training unroll lengths growing by stages. Every
``period`` outer steps the meta-params are validated on held-out task instances at the next
stage's length; a stage lasts at least ``min_periods`` periods and advances once it has beaten
its baseline (the previous best re-validated at the new length); a stage that does not within
``max_periods`` periods stops training, and the best meta-params are exported.

Scaled down for a 2-core CPU (a few minutes): the embedded 8x8 digits instead of MNIST, stages
(20, 40, 80) instead of (100, 200, 500, 1000, ...), 8 particles. Scale up with e.g.
``--config.task.dataset=mnist --config.curriculum.stages='(100, 200, 500, 1000)'
--config.curriculum.period=100 --config.num_outer_steps=20000``. Turn the curriculum off for the
ablation with ``--config.curriculum.enabled=False`` (training then uses ``unroll.horizon``).
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    c.num_outer_steps = 600  # a budget; the curriculum usually stops earlier
    c.log_every = 25
    c.checkpoint_every = 50
    c.task = ConfigDict(dict(name="mlp_orig", dataset="digits", batch_size=128, permute_classes=True))
    c.lopt = ConfigDict(dict(name="lstm_dm"))  # 2 x 20 LSTM, LogAndSign k=5, output x 0.01
    c.estimator = ConfigDict(dict(name="tbptt", first_order=True))
    c.meta_optimizer = ConfigDict(dict(name="adam", learning_rate=3e-3, clip_grad_norm=1.0))
    c.unroll = ConfigDict(
        dict(
            num_particles=8,
            trunc_length=10,
            # Used only with the curriculum disabled: each stage sets constant(N_train).
            horizon=ConfigDict(dict(name="constant", length=80)),
            meta_loss=ConfigDict(dict(split="train", normalize="initial", clip=2.0)),
        )
    )
    c.curriculum = ConfigDict(
        dict(
            enabled=True,
            stages=(20, 40, 80),  # N_train; a stage validates at the next one (N_valid)
            period=25,  # T_period, outer steps between validations
            min_periods=2,  # N_period
            max_periods=4,  # periods a stage gets to beat its baseline before training stops
            valid_seeds=8,  # held-out task instances per validation
            valid_metric="final_train_loss",
            restart_from_best=True,
        )
    )
    return c
