"""Time one update of every learned optimizer relative to optax.adam on the same pytree.

    python scripts/benchmark_optimizers.py                       # 1e4 .. 1e7 parameters
    python scripts/benchmark_optimizers.py --max_size=100000 --reps=5   # quick
    python scripts/benchmark_optimizers.py --sizes=1e6,1e8 --peak_gbs=3350   # e.g. an H100
    python scripts/benchmark_optimizers.py --optimizers=mlp --fused --sizes=1e7,1e8   # GPU

``--framework=torch`` times ``lopt.torch`` instead: one ``optimizer.step()`` of ``mlp`` and
``adafac_mlp`` (freshly initialised meta-params) against ``torch.optim.Adam``'s on the same
tensors, on the CPU with ``--threads`` threads (default 1), after ``--warmup`` steps; the table
shows the median time relative to Adam's and the absolute time:

    python scripts/benchmark_optimizers.py --framework=torch --sizes=1e5,1e6,1e7

``--fused`` also times every selected optimizer that has a ``fused`` option (``mlp``: its
Pallas kernel on a GPU, lopt/mlp_fused.py; its C++ kernel on a CPU, lopt/mlp_cpu.py;
``adafac_mlp``: its C++ kernel on a CPU, lopt/adafac_cpu.py) with ``fused=True``, in a row
``<name> fused`` below the unfused one:

    python scripts/benchmark_optimizers.py --optimizers=mlp,adafac_mlp --fused --sizes=1e5,1e6,1e7

For each parameter count N the pytree mixes leaf kinds the way a small network does: a dense
kernel (about 60% of N, 256 columns), an HWIO conv kernel (about 30%), an embedding-like
table (about 9%, 64 columns), a bias vector (the rest) and a scalar. Every optimizer's
``update`` (learned ones with their meta-params as jit arguments, freshly initialised) is
jitted with its state donated, run ``--warmup`` times, then timed ``--reps`` times with
``block_until_ready``; the table shows the median time relative to ``optax.adam``'s median and
the absolute time. For ``mlp`` and ``adafac_mlp`` a third table gives the per-coordinate
network's arithmetic rate (GFLOP/s) beside a bare matmul chain of the same shapes on the same
device. ``GB/s`` is the effective bandwidth: bytes of (gradients, parameters, state
in, updates, state out) over the median time, a lower bound on the memory traffic; with
``--peak_gbs`` it is also shown as a fraction of the device's peak memory bandwidth.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

_SIZES = flags.DEFINE_list("sizes", ["1e4", "1e5", "1e6", "1e7"], "Parameter counts.")
_MAX_SIZE = flags.DEFINE_float("max_size", None, "Skip parameter counts above this.")
_REPS = flags.DEFINE_integer("reps", 7, "Timed runs per optimizer and size (the median is shown).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed runs after compiling.")
_OPTIMIZERS = flags.DEFINE_list(
    "optimizers", None, "Learned optimizers to time (registry names); default all registered."
)
_FUSED = flags.DEFINE_bool(
    "fused", False,
    "Also time optimizers with a `fused` option (mlp, adafac_mlp) with fused=True, as "
    "'<name> fused'.",
)
_FRAMEWORK = flags.DEFINE_enum(
    "framework", "jax", ["jax", "torch"],
    "jax: optax updates, jitted; torch: lopt.torch's optimizers against torch.optim.Adam.",
)
_THREADS = flags.DEFINE_integer("threads", 1, "--framework=torch: torch.set_num_threads.")
_PEER_PYTHON = flags.DEFINE_string(
    "peer_python", None,
    "A Python with google/learned_optimization installed (e.g. /work/peer/venv/bin/python): "
    "also time its own VeLO (scripts/peer/bench_velo_learned_optimization.py) in a subprocess "
    "on the same sizes, as the row 'velo (learned_optimization)'.",
)
_PEAK_GBS = flags.DEFINE_float(
    "peak_gbs", None, "The device's peak memory bandwidth in GB/s, to report the fraction achieved."
)


def make_params(n: int):
    """A pytree of about ``n`` float32 parameters (see module docstring); exact count returned."""
    import jax.numpy as jnp

    cols = 256
    rows = max(1, round(0.6 * n / cols))
    ch = max(1, round((0.3 * n / 9) ** 0.5))
    emb_rows = max(1, round(0.09 * n / 64))
    used = rows * cols + 9 * ch * ch + emb_rows * 64 + 1
    params = {
        "dense": jnp.full((rows, cols), 0.01, jnp.float32),
        "conv": jnp.full((3, 3, ch, ch), 0.01, jnp.float32),
        "embed": jnp.full((emb_rows, 64), 0.01, jnp.float32),
        "bias": jnp.zeros((max(1, n - used),), jnp.float32),
        "scale": jnp.ones((), jnp.float32),
    }
    count = sum(int(x.size) for x in params.values())
    return params, count


def _nbytes(tree) -> int:
    import jax

    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def time_update(init_fn, update_fn, args, params, grads, reps: int, warmup: int):
    """(median seconds, bytes touched) of ``update_fn(*args, grads, state, params)``."""
    import jax

    state = init_fn(*args, params)
    step = jax.jit(update_fn, donate_argnums=len(args) + 1)
    updates, state = step(*args, grads, state, params)  # compile
    jax.block_until_ready((updates, state))
    nbytes = 2 * _nbytes(state) + _nbytes(updates) + _nbytes(grads) + _nbytes(params)
    for _ in range(warmup):
        updates, state = step(*args, grads, state, params)
        jax.block_until_ready((updates, state))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        updates, state = step(*args, grads, state, params)
        jax.block_until_ready((updates, state))
        times.append(time.perf_counter() - t0)
    del updates, state
    return statistics.median(times), nbytes


def _fmt_time(t: float) -> str:
    return f"{t * 1e3:.3g} ms" if t < 1 else f"{t:.3g} s"


def variants(names: list[str], fused: bool) -> list[tuple[str, object]]:
    """(row label, learned optimizer) per optimizer to time: each registered default, unfused
    (``fused=False``) for those with a ``fused`` option, whose default (``"auto"``) would run
    the kernel on a CPU; with ``fused`` also ``fused=True`` for those."""
    import dataclasses

    import lopt

    out = []
    for name in names:
        learned_opt = lopt.get(name)
        has_option = dataclasses.is_dataclass(learned_opt) and "fused" in {
            f.name for f in dataclasses.fields(learned_opt)
        }
        out.append((name, dataclasses.replace(learned_opt, fused=False) if has_option else learned_opt))
        if fused and has_option:
            out.append((f"{name} fused", dataclasses.replace(learned_opt, fused=True)))
    if fused and len(out) == len(names):
        raise app.UsageError(f"--fused: none of {', '.join(names)} has a `fused` option (mlp and adafac_mlp have)")
    return out


def time_torch_step(opt, params, reps: int, warmup: int) -> float:
    """Median seconds of ``opt.step()`` on ``params`` (their ``.grad`` set; velo also gets a
    loss)."""
    kw = {"loss": 1.0} if getattr(opt, "architecture", "") == "velo" else {}
    for _ in range(warmup):
        opt.step(**kw)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        opt.step(**kw)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main_torch(sizes: list[int]) -> None:
    """The ``--framework=torch`` table: lopt.torch's mlp and adafac_mlp against torch Adam."""
    import jax
    import numpy as np
    import torch

    import lopt
    import lopt.torch as lopt_torch

    torch.set_num_threads(_THREADS.value)
    names = _OPTIMIZERS.value or ["mlp", "adafac_mlp"]
    classes = {"mlp": lopt_torch.MLPLOptTorch, "adafac_mlp": lopt_torch.AdafacMLPLOptTorch,
               "velo": lambda ps, lo, mp: lopt_torch.VeloTorch(ps, lo, mp, num_steps=10_000)}
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise app.UsageError(f"--framework=torch: lopt.torch has mlp, adafac_mlp and velo, not "
                             f"{', '.join(unknown)}")
    rows: dict[str, dict[int, str]] = {"adam": {}}
    counts = {}
    for n in sizes:
        jax_params, counts[n] = make_params(n)
        params = [torch.from_numpy(np.array(p)).requires_grad_(True)
                  for p in jax.tree.leaves(jax_params)]
        for p in params:
            p.grad = p.detach() * 0.5 + 1e-3
        t_adam = time_torch_step(torch.optim.Adam(params, lr=1e-3), params, _REPS.value,
                                 _WARMUP.value)
        rows["adam"][n] = f"1.00x ({_fmt_time(t_adam)})"
        print(f"{counts[n]:>12,} {'adam':12s} {_fmt_time(t_adam)}", file=sys.stderr, flush=True)
        for name in names:
            learned_opt = lopt.get(name)
            meta_params = jax.tree.map(np.asarray, learned_opt.init(jax.random.PRNGKey(0)))
            opt = classes[name](params, learned_opt, meta_params)
            t = time_torch_step(opt, params, _REPS.value, _WARMUP.value)
            rows.setdefault(name, {})[n] = f"{t / t_adam:.1f}x ({_fmt_time(t)})"
            print(f"{counts[n]:>12,} {name:12s} {rows[name][n]}", file=sys.stderr, flush=True)
            del opt
    print(f"\nTime of one optimizer.step() relative to torch.optim.Adam (median of {_REPS.value}, "
          f"{_WARMUP.value} warm-up steps) on the CPU, {torch.get_num_threads()} thread(s), "
          f"torch {torch.__version__}")
    _table(rows, sizes, counts)


def main(argv):
    del argv
    if _FRAMEWORK.value == "torch":
        sizes = [int(float(s)) for s in _SIZES.value]
        if _MAX_SIZE.value is not None:
            sizes = [s for s in sizes if s <= _MAX_SIZE.value]
        return main_torch(sizes)
    import jax
    import jax.numpy as jnp
    import optax

    import lopt
    from lopt.base import build_optimizer

    sizes = [int(float(s)) for s in _SIZES.value]
    if _MAX_SIZE.value is not None:
        sizes = [s for s in sizes if s <= _MAX_SIZE.value]
    to_time = variants(_OPTIMIZERS.value or lopt.names(), _FUSED.value)
    adam = optax.adam(1e-3)
    rows: dict[str, dict[int, str]] = {"adam": {}}
    bandwidth: dict[str, dict[int, str]] = {"adam": {}}
    counts = {}
    for n in sizes:
        params, counts[n] = make_params(n)
        grads = jax.tree.map(lambda p: p * 0.5 + 1e-3, params)
        t_adam, b_adam = time_update(
            lambda p: adam.init(p), lambda g, s, p: adam.update(g, s, p), (), params, grads,
            _REPS.value, _WARMUP.value,
        )
        rows["adam"][n] = f"1.00x ({_fmt_time(t_adam)})"
        bandwidth["adam"][n] = _fmt_bw(b_adam, t_adam)
        print(f"{counts[n]:>12,} {'adam':12s} {_fmt_time(t_adam)}", file=sys.stderr, flush=True)
        for name, learned_opt in to_time:
            meta_params = learned_opt.init(jax.random.PRNGKey(0))
            try:
                t, b = time_update(  # velo reads a horizon and the loss; the others ignore both
                    lambda mp, p, lo=learned_opt: build_optimizer(lo, mp, 10_000).init(p),
                    lambda mp, g, s, p, lo=learned_opt: build_optimizer(lo, mp, 10_000).update(
                        g, s, p, value=jnp.float32(1.0)),
                    (meta_params,), params, grads, _REPS.value, _WARMUP.value,
                )
            except Exception as e:  # e.g. out of memory at the largest sizes
                rows.setdefault(name, {})[n] = f"failed: {type(e).__name__}"
                bandwidth.setdefault(name, {})[n] = "-"
                print(f"{name} at {n}: {str(e).splitlines()[0][:200]}", file=sys.stderr)
                continue
            rows.setdefault(name, {})[n] = f"{t / t_adam:.2f}x ({_fmt_time(t)})"
            bandwidth.setdefault(name, {})[n] = _fmt_bw(b, t)
            print(f"{counts[n]:>12,} {name:12s} {rows[name][n]}", file=sys.stderr, flush=True)

    if _PEER_PYTHON.value:
        peer = time_peer_velo(sizes)
        rows["velo (learned_optimization)"] = {
            n: f"{peer[n] / _parse_time(rows['adam'][n]):.2f}x ({_fmt_time(peer[n])})" for n in peer}

    flops_rows = {}
    for name, learned_opt in to_time:
        shapes = layer_shapes(learned_opt.init(jax.random.PRNGKey(0)))
        if not shapes or name.split()[0] not in ("mlp", "adafac_mlp"):
            continue
        for n in sizes:
            cell = rows.get(name, {}).get(n, "")
            if "(" not in cell or "failed" in cell:
                continue
            t = _parse_time(cell)
            flops = 2 * counts[n] * sum(a * b for a, b in shapes)
            t_mm = time_matmul_chain(counts[n], shapes, _REPS.value, _WARMUP.value)
            flops_rows.setdefault(name, {})[n] = (
                f"{flops / t / 1e9:.3g} vs {flops / t_mm / 1e9:.3g} GFLOP/s ({t_mm / t:.0%})")

    device = jax.devices()[0]
    print(
        f"\nTime of one jitted update relative to optax.adam (median of {_REPS.value}, "
        f"{_WARMUP.value} warm-up runs) on {device.platform} ({device.device_kind}), "
        f"jax {jax.__version__}"
    )
    _table(rows, sizes, counts)
    print("\nEffective bandwidth (bytes of grads, params, state in/out and updates per second)")
    _table(bandwidth, sizes, counts)
    if flops_rows:
        print("\nThe per-coordinate MLP's arithmetic: 2 x N x sum(fan_in x fan_out) over its layers "
              "(an upper bound: mlp folds its time features into a per-step bias) per update, "
              "achieved by the whole update vs by a bare chain of matmuls of the same shapes "
              "([N, fan_in] @ [fan_in, fan_out], relu between) on the same device; the percentage "
              "is the update's share of the matmul chain's rate")
        _table(flops_rows, sizes, counts)


def time_peer_velo(sizes: list[int]) -> dict[int, float]:
    """{size: median seconds} of learned_optimization's VeLO update, timed by
    scripts/peer/bench_velo_learned_optimization.py under ``--peer_python``."""
    import json
    import subprocess

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer",
                          "bench_velo_learned_optimization.py")
    out = subprocess.run([_PEER_PYTHON.value, script, f"--sizes={','.join(map(str, sizes))}",
                          f"--reps={_REPS.value}", f"--warmup={_WARMUP.value}"],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise app.UsageError(f"--peer_python: the peer benchmark failed: {out.stderr.strip()[-300:]}")
    return {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def layer_shapes(meta_params) -> list[tuple[int, int]]:
    """(fan_in, fan_out) of every 2-D weight of a learned optimizer's per-coordinate network."""
    import jax

    return [tuple(int(d) for d in x.shape) for x in jax.tree.leaves(meta_params) if x.ndim == 2]


def time_matmul_chain(n: int, shapes, reps: int, warmup: int) -> float:
    """Median seconds of the bare matmul chain of ``shapes`` over ``n`` rows (jitted)."""
    import jax
    import jax.numpy as jnp

    ws = [jnp.full(s, 0.01, jnp.float32) for s in shapes]
    x = jnp.full((n, shapes[0][0]), 0.5, jnp.float32)

    @jax.jit
    def chain(x, ws):
        for i, w in enumerate(ws):
            x = x @ w
            if i < len(ws) - 1:
                x = jax.nn.relu(x)
        return x

    for _ in range(warmup + 1):
        jax.block_until_ready(chain(x, ws))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(chain(x, ws))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _parse_time(cell: str) -> float:
    """Seconds from a table cell such as ``3.21x (12.3 ms)``."""
    value, unit = cell.split("(", 1)[1].rstrip(")").split()
    return float(value) * (1e-3 if unit == "ms" else 1.0)


def _fmt_bw(nbytes: int, t: float) -> str:
    gbs = nbytes / t / 1e9
    out = f"{gbs:.3g} GB/s"
    if _PEAK_GBS.value:
        out += f" ({100 * gbs / _PEAK_GBS.value:.0f}%)"
    return out


def _table(rows, sizes, counts) -> None:
    header = ["optimizer"] + [f"{s:.0e} ({counts[s]:,})".replace("e+0", "e") for s in sizes]
    lines = [header] + [[name] + [cells.get(s, "-") for s in sizes] for name, cells in rows.items()]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    fmt = lambda line: "| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |"
    print(fmt(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for line in lines[1:]:
        print(fmt(line))


if __name__ == "__main__":
    app.run(main)
