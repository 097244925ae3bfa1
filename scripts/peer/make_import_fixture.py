"""Write the parity fixtures of issue 25 with google/learned_optimization's own code.

    PEER_DIR=/work/peer bash scripts/peer/setup_venv.sh
    /work/peer/venv/bin/python scripts/peer/make_import_fixture.py --out=tests/lopt/data
    /work/peer/venv/bin/python scripts/peer/make_import_fixture.py --out=/tmp/draw3 --seed=3
    python scripts/peer/check_import_parity.py --data=/tmp/draw3   # this project's venv

For each of its MLPLOpt (``mlp``) and AdafacMLPLOpt (``adafac_mlp``, hidden size 32 as PyLO's
small_fc_lopt): meta-params from its ``init``, perturbed so every weight, bias and decay offset
matters, saved as a ``ParameterCheckpoint`` with its ``checkpoints.save_state``
(``peer_<arch>_params.msgpack``, what ``lopt-import --params`` reads); then 100 of its jitted
updates of four tensors (a 2-D kernel whose larger axis comes first, a bias, an HWIO conv
kernel with a tie between its two 3-sized axes, a scalar) on a noisy quadratic with one dead
kernel column (gradient exactly 0), written to ``peer_<arch>.npz``: ``p/<leaf>`` [100, ...] the
parameters fed to each update (its own trajectory), ``g/<leaf>`` [100, ...] the gradients fed
in, ``step/<leaf>`` [100, ...] the step its update subtracts (``new_p = p - step``). ``step`` is
read from its own update: the update function is traced to a jaxpr and the operand its
``p - step`` subtracts is made the output (jitted, as the update is), since ``new_p - p`` in
float32 would lose the step's low bits to the parameter's rounding. The script checks that
``p - step`` is the update's own new parameters to 1 ulp (XLA compiles the two programs a
little differently, and a few entries round apart) and says how many differ.

``--seed`` draws other meta-params, parameters and gradients (0, the default, writes the
committed fixtures, bit for bit); ``scripts/peer/check_import_parity.py`` then measures this
project's import against them in JAX and torch.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
from learned_optimization import checkpoints
from learned_optimization.learned_optimizers import adafac_mlp_lopt, mlp_lopt
from learned_optimization.outer_trainers import gradient_learner

STEPS = 100
SHAPES = {"kernel": (10, 6), "bias": (6,), "conv": (3, 3, 2, 4), "scale": ()}


def perturbed(theta, key):
    """Every leaf moved off its init: weights by 0.5 of their own scale, biases (zero at init)
    by 0.1, decay offsets (zero at init) by 0.05."""
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(theta)
    keys = jax.random.split(key, len(paths_leaves))
    out = []
    for k, (path, x) in zip(keys, paths_leaves):
        noise = jax.random.normal(k, x.shape, jnp.float32)
        if x.ndim == 2:
            out.append(x + 0.5 * jnp.std(x) * noise)
        elif "decays" in jax.tree_util.keystr(path):
            out.append(x + 0.05 * noise)
        else:
            out.append(x + 0.1 * noise)
    return jax.tree_util.tree_unflatten(treedef, out)


def step_fn(opt, state, grad):
    """A jitted function (state, grad) -> the steps the peer's update subtracts, per leaf."""
    def update(st, g):
        return opt.update(st, g, loss=jnp.asarray(0.0))

    closed = jax.make_jaxpr(update)(state, grad)
    jaxpr = closed.jaxpr
    out_paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(jax.eval_shape(update, state, grad))[0]]
    in_vars = jaxpr.invars
    in_paths = [p for p, _ in jax.tree_util.tree_flatten_with_path((state, grad))[0]]
    producer = {v: e for e in jaxpr.eqns for v in e.outvars}
    steps = []
    for name in sorted(SHAPES):
        path_str = f".params['{name}']"
        i_out = next(i for i, p in enumerate(out_paths) if jax.tree_util.keystr(p) == path_str)
        i_in = next(i for i, p in enumerate(in_paths) if jax.tree_util.keystr(p) == f"[0]{path_str}")
        eqn = producer[jaxpr.outvars[i_out]]
        while eqn.primitive.name in ("squeeze", "reshape", "convert_element_type"):
            eqn = producer[eqn.invars[0]]
        assert eqn.primitive.name == "sub", (name, eqn)
        src = eqn.invars[0]
        while src is not in_vars[i_in]:  # the scalar leaf is expanded to [1] first
            src = producer[src].invars[0]
        steps.append(eqn.invars[1])
    stepped = jaxpr.replace(outvars=steps)

    @jax.jit
    def run(st, g):
        flat = jax.tree_util.tree_leaves((st, g))
        out = jax.core.eval_jaxpr(stepped, closed.consts, *flat)
        return {n: jnp.reshape(s, SHAPES[n]) for n, s in zip(sorted(SHAPES), out)}

    return run


def trajectory(opt, params, seed: int):
    """(gradients, steps, parameters) of 100 peer updates on a noisy quadratic."""
    rng = np.random.default_rng(seed)
    target = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    curv = {k: rng.uniform(0.5, 2.0, size=s).astype(np.float32) for k, s in SHAPES.items()}
    state = opt.init(params, num_steps=STEPS)
    update = jax.jit(lambda st, g: opt.update(st, g, loss=jnp.asarray(0.0)))
    get_steps = None
    gs, ss, ps = [], [], [jax.tree_util.tree_map(np.asarray, params)]
    ulps = [0]
    for _ in range(STEPS):
        p = ps[-1]
        g = {k: (curv[k] * (p[k] - target[k])
                 + 0.3 * rng.normal(size=SHAPES[k])).astype(np.float32) for k in SHAPES}
        g["kernel"][:, 0] = 0.0  # a dead unit: exact zeros reach the epsilons
        if get_steps is None:
            get_steps = step_fn(opt, state, g)
        s = jax.tree_util.tree_map(np.asarray, get_steps(state, g))
        state = update(state, g)
        new_p = jax.tree_util.tree_map(np.asarray, state.params)
        for k in SHAPES:
            # 0, or 1 ulp where the two programs XLA compiled round apart
            off = np.abs(np.float32(p[k] - s[k]) - new_p[k])
            assert np.all(off <= np.spacing(np.maximum(np.abs(p[k]), np.abs(new_p[k])))), k
            ulps[0] += int(np.count_nonzero(off))
        gs.append(g), ss.append(s), ps.append(new_p)
    stack = lambda trees, k: np.stack([t[k] for t in trees])  # noqa: E731
    print(f"  p - step differs from the update's new parameters by 1 ulp in {ulps[0]} of "
          f"{STEPS * sum(int(np.prod(s)) for s in SHAPES.values())} entries")
    return ({k: stack(gs, k) for k in SHAPES}, {k: stack(ss, k) for k in SHAPES},
            {k: stack(ps[:-1], k) for k in SHAPES})


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="tests/lopt/data")
    parser.add_argument("--seed", type=int, default=0,
                        help="another draw of meta-params, parameters and gradients (0: the fixture)")
    args = parser.parse_args()
    base = 1000 * args.seed
    os.makedirs(args.out, exist_ok=True)
    peers = {"mlp": mlp_lopt.MLPLOpt(compute_summary=False),
             "adafac_mlp": adafac_mlp_lopt.AdafacMLPLOpt(hidden_size=32)}
    rng = np.random.default_rng(base)
    params = {"kernel": rng.normal(size=SHAPES["kernel"]) / np.sqrt(10),
              "bias": 0.1 * rng.normal(size=SHAPES["bias"]),
              "conv": 0.3 * rng.normal(size=SHAPES["conv"]), "scale": np.asarray(1.0)}
    params = {k: np.asarray(v, np.float32) for k, v in params.items()}
    for i, (arch, lo) in enumerate(peers.items()):
        theta = perturbed(lo.init(jax.random.PRNGKey(base + i)), jax.random.PRNGKey(base + 100 + i))
        checkpoints.save_state(os.path.join(args.out, f"peer_{arch}_params.msgpack"),
                               gradient_learner.ParameterCheckpoint(theta, "fixture", 0))
        gs, ss, ps = trajectory(lo.opt_fn(theta), params, seed=base + 10 + i)
        arrays = {f"p/{k}": v for k, v in ps.items()}
        arrays.update({f"g/{k}": v for k, v in gs.items()})
        arrays.update({f"step/{k}": v for k, v in ss.items()})
        path = os.path.join(args.out, f"peer_{arch}.npz")
        np.savez_compressed(path, **arrays)
        rel = max(float(np.max(np.abs(ss[k]))) for k in SHAPES)
        print(f"{arch}: wrote {path} ({os.path.getsize(path) // 1024} KB); largest |step| {rel:.3g}; "
              f"jax {jax.__version__}")


if __name__ == "__main__":
    main()
