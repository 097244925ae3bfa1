"""Quickstart: PES meta-training of a per-parameter MLP optimizer on digits MLPs.

    python scripts/meta_train.py --config=configs/quickstart.py --workdir=runs/quickstart

The learned optimizer is Metz et al. 2019's per-parameter MLP (App. D.1: momenta at five decays,
gradient, weight, tanh time features, exp(1e-3 o1) 1e-3 o2) with two hidden layers of 32 and
learned_optimization's 11 timescales, where the paper has one hidden layer and 9 timescales
(``--config.lopt.hidden_layers=1 --config.lopt.timescales=metz2019``). PES's ``std=0.01`` is
ours (Metz et al. smooth with sigma^2 = 0.01, i.e. std 0.1).

Small enough for a 2-core CPU (about two and a half minutes of meta-training); every option
below can be overridden on the command line, e.g. ``--config.estimator.std=0.003
--config.num_outer_steps=100``.

Budget: 5,000 outer steps (800k inner steps). Measured with ``scripts/reproduce.py
--experiment=quickstart`` (docs/results/quickstart.md): at 600 outer steps the optimizer's mean
normalised training loss over the 200-step horizon on held-out instances was 0.12 against tuned
Adam's 0.077; at 3,000 it was level with Adam (0.077); at 5,000 below it.
"""

from ml_collections import ConfigDict

from lopt.training.config import tuple_ref


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    c.num_devices = 0  # shard the particles over every visible device
    c.num_outer_steps = 5000
    c.log_every = 10
    c.checkpoint_every = 500
    c.checkpoint_keep = 2  # the newest checkpoints kept
    c.checkpoint_keep_every = 0  # K > 0: also keep every K-th step (for lopt-export --step)
    # Inner problem: a one-hidden-layer MLP on sklearn's 8x8 digits; every task instance has its
    # own init seed and a random relabelling of the classes.
    c.task = ConfigDict(
        dict(name="digits_mlp", hidden_sizes=(32,), activation="relu", batch_size=64,
             permute_classes=True)
    )
    # fused: an execution option (lopt/execution.py), same numbers to float rounding; "auto"
    # runs the fused C++ kernel on a CPU (a one-line notice where it cannot be built), the
    # unfused update on a GPU; True or False force it. bf16_hidden (with the CPU kernel and
    # AVX512-BF16): the middle layer's products in bfloat16, an approximation within a stated
    # bound (lopt/mlp_cpu.py), off here.
    c.lopt = ConfigDict(dict(name="mlp", hidden_size=32, hidden_layers=2, fused="auto",
                             bf16_hidden=False))
    c.estimator = ConfigDict(dict(name="pes", std=0.01))
    c.meta_optimizer = ConfigDict(dict(name="adam", learning_rate=3e-3, clip_grad_norm=3.0))
    c.unroll = ConfigDict(
        dict(
            num_particles=8,  # 4 antithetic pairs
            trunc_length=20,
            horizon=ConfigDict(dict(name="constant", length=200)),
            meta_loss=ConfigDict(dict(split="train", normalize="initial", clip=2.0)),
        )
    )
    h = c.unroll.horizon.get_ref("length")
    # Held-out evaluation during meta-training (lopt.training.continuous_eval) at H and 10 H
    # every 500 outer steps, against tuned Adam. Off: on a 2-core CPU it took 65 s of a 277 s
    # run (adding about 30%; at H alone, --config.eval.lengths="(200,)", 15 s of 179 s, about
    # 10%). --config.eval.enabled=True turns it on.
    c.eval = ConfigDict(dict(enabled=False, every=500, lengths=tuple_ref(h, 10 * h), seeds=8,
                             tasks=None, baseline="adam"))
    return c
