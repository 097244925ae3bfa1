"""Record a VeLO parity fixture with Google's own code (run with the peer's venv).

    /work/peer/venv/bin/python scripts/peer/make_velo_fixture.py --out=tests/lopt/data/velo_small \
        --lstm_hidden_size=32 --param_inits=8
    /work/peer/venv/bin/python scripts/peer/make_velo_fixture.py --out=/tmp/velo_full   # published sizes

Builds learned_optimization's ``HyperV2`` (``use_bugged_loss_features=False``, every other
argument at its default unless given), perturbs its initial meta-params (so that every array,
zero-initialised biases and LSTM state included, carries values that matter), and writes them in
the peer's checkpoint format: ``OUT/params`` (flax msgpack of
``ParameterCheckpoint(params, gen_id, step)``) beside ``OUT/config.gin``. It then loads them back
through ``opt_from_checkpoint`` (the peer's own loader, when it imports) and runs 50 updates on a
2-D kernel with more rows than columns, one with fewer, a 4-D conv kernel and a bias, with a
gradient spike past the +-1000 clip (step 10) and a loss spike (step 20), recording
``OUT/trajectory.npz``: ``params_<name>`` [steps + 1, ...], ``grads_<name>`` [steps, ...],
``losses`` [steps], ``num_steps``. Gradients come from a quadratic with noise, so they follow the
peer's trajectory; a replay feeds the recorded ones.
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from learned_optimization import checkpoints  # noqa: E402
from learned_optimization.outer_trainers import gradient_learner  # noqa: E402
from learned_optimization.research.general_lopt import hyper_v2  # noqa: E402

SHAPES = {"a_tall": (7, 3), "b_wide": (2, 6), "c_conv": (3, 3, 2, 4), "d_bias": (5,)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--lstm_hidden_size", type=int, default=512)
    ap.add_argument("--param_inits", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--num_steps", type=int, default=120, help="the horizon given to init")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--control_scale", type=float, default=0.1)
    ap.add_argument("--step_bias", type=float, default=20.0)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    lo = hyper_v2.HyperV2(lstm_hidden_size=args.lstm_hidden_size, param_inits=args.param_inits,
                          use_bugged_loss_features=False)
    theta = lo.init(jax.random.PRNGKey(args.seed))
    rng = np.random.default_rng(args.seed)

    def perturb(x):
        x = np.asarray(x, np.float32)
        scale = max(float(np.sqrt(np.mean(x * x))), 0.1)
        return jnp.asarray(x + 0.3 * scale * rng.standard_normal(x.shape).astype(np.float32))

    theta = jax.tree_util.tree_map(perturb, theta)
    # Scale the mixing weights (100 mean_k c_k W_k) to a trained optimizer's range, and shift the
    # step multiplier so the parameters move well beyond float32 rounding without blowing up.
    ctl = theta["rnn_params"]["rnn_to_controls"]
    ctl["w"], ctl["b"] = ctl["w"] * args.control_scale, ctl["b"] * args.control_scale
    theta["rnn_params"]["step_size"]["b"] = theta["rnn_params"]["step_size"]["b"] + args.step_bias
    path = os.path.join(args.out, "params")
    checkpoints.save_state(path, gradient_learner.ParameterCheckpoint(theta, "velo-parity", 0))
    with open(os.path.join(args.out, "config.gin"), "w") as f:
        f.write("run_train.lopt = @HyperV2()\n"
                f"HyperV2.lstm_hidden_size = {args.lstm_hidden_size}\n"
                f"HyperV2.param_inits = {args.param_inits}\n"
                "HyperV2.use_bugged_loss_features = False\n")

    try:  # the peer's own loader, as users of the published checkpoint call it
        from learned_optimization.learned_optimizers import opt_from_checkpoint
        opt = opt_from_checkpoint.opt_from_checkpoint(path)
        loader = "opt_from_checkpoint"
    except Exception as e:  # noqa: BLE001 (outer_train's imports may be missing in a venv)
        ckpt = checkpoints.load_state(path, gradient_learner.ParameterCheckpoint(theta, "", 0))
        opt = lo.opt_fn(ckpt.params)
        loader = f"checkpoints.load_state ({type(e).__name__}: {e})"
    print("loaded with", loader)

    params = {k: jnp.asarray(rng.standard_normal(s).astype(np.float32) * 0.5) for k, s in SHAPES.items()}
    targets = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    state = opt.init(params, num_steps=args.num_steps, key=jax.random.PRNGKey(1))
    update = jax.jit(opt.update)
    traj = {k: [np.asarray(v)] for k, v in params.items()}
    grads_rec = {k: [] for k in SHAPES}
    losses = []
    for t in range(args.steps):
        p = opt.get_params(state)
        g = {k: np.asarray(p[k]) - targets[k] + 0.1 * rng.standard_normal(SHAPES[k]).astype(np.float32)
             for k in SHAPES}
        loss = float(sum(0.5 * np.mean(np.square(np.asarray(p[k]) - targets[k])) for k in SHAPES))
        loss += 0.05 * float(rng.standard_normal())
        if t == 10:  # gradient spike past the clip
            g["a_tall"][0, 0] = 5e4
            g["c_conv"] = g["c_conv"] * 3000.0
            g["d_bias"][1] = -2e3
        if t == 20:  # loss spike
            loss = loss * 100.0
        g = {k: v.astype(np.float32) for k, v in g.items()}
        state = update(state, {k: jnp.asarray(v) for k, v in g.items()}, loss=jnp.float32(loss),
                       key=jax.random.PRNGKey(t))
        losses.append(np.float32(loss))
        for k in SHAPES:
            grads_rec[k].append(g[k])
            traj[k].append(np.asarray(opt.get_params(state)[k]))
    out = {"losses": np.asarray(losses, np.float32), "num_steps": np.int32(args.num_steps)}
    for k in SHAPES:
        out[f"params_{k}"] = np.stack(traj[k]).astype(np.float32)
        out[f"grads_{k}"] = np.stack(grads_rec[k]).astype(np.float32)
    np.savez_compressed(os.path.join(args.out, "trajectory.npz"), **out)
    moved = {k: float(np.max(np.abs(out[f"params_{k}"][-1] - out[f"params_{k}"][0]))) for k in SHAPES}
    print("wrote", args.out, "max movement per tensor:", moved)


if __name__ == "__main__":
    main()
