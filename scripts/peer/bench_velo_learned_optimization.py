"""Time learned_optimization's own VeLO update (run with the peer's venv); used by
``scripts/benchmark_optimizers.py --peer_python=...``, which prints its rows beside ours.

    /work/peer/venv/bin/python scripts/peer/bench_velo_learned_optimization.py --sizes=1e6,1e7

HyperV2 in the published configuration (``lstm_hidden_size=512, param_inits=256,
use_bugged_loss_features=False``), freshly initialised, on the parameter tree of
``scripts/benchmark_optimizers.py``'s ``make_params`` (same shapes, built here so this script
imports nothing of lopt): its jitted ``opt.update(state, grads, loss=...)``, ``--warmup`` untimed
runs after compiling, then the median of ``--reps`` with ``block_until_ready``. Prints one JSON
line: {size: seconds}.
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from learned_optimization.research.general_lopt import hyper_v2  # noqa: E402


def make_params(n):
    cols = 256
    rows = max(1, round(0.6 * n / cols))
    ch = max(1, round((0.3 * n / 9) ** 0.5))
    emb_rows = max(1, round(0.09 * n / 64))
    used = rows * cols + 9 * ch * ch + emb_rows * 64 + 1
    return {"dense": jnp.full((rows, cols), 0.01, jnp.float32),
            "conv": jnp.full((3, 3, ch, ch), 0.01, jnp.float32),
            "embed": jnp.full((emb_rows, 64), 0.01, jnp.float32),
            "bias": jnp.zeros((max(1, n - used),), jnp.float32),
            "scale": jnp.ones((), jnp.float32)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1e6,1e7")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    lo = hyper_v2.HyperV2(lstm_hidden_size=512, param_inits=256, use_bugged_loss_features=False)
    opt = lo.opt_fn(lo.init(jax.random.PRNGKey(0)))
    out = {}
    for s in args.sizes.split(","):
        n = int(float(s))
        params = make_params(n)
        grads = jax.tree_util.tree_map(lambda p: p * 0.5 + 1e-3, params)
        state = opt.init(params, num_steps=10_000)
        loss = jnp.float32(1.0)
        key = jax.random.PRNGKey(0)
        state = opt.update(state, grads, loss=loss, key=key)
        jax.block_until_ready(state)
        for _ in range(args.warmup):
            state = jax.block_until_ready(opt.update(state, grads, loss=loss, key=key))
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            state = jax.block_until_ready(opt.update(state, grads, loss=loss, key=key))
            times.append(time.perf_counter() - t0)
        out[n] = statistics.median(times)
        del state
    print(json.dumps(out))


if __name__ == "__main__":
    main()
