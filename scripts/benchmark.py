"""Meta-training throughput benchmarks (inner steps per second = particles x inner steps / wall
time, compile excluded), printed as tables.

    python scripts/benchmark.py --workload=w1              # W1: the issue's reference workload
    python scripts/benchmark.py --workload=estimators      # every estimator on W1's task
    python scripts/benchmark.py --workload=particles       # particles 16 -> 256 on one device
    python scripts/benchmark.py --workload=particles --particle_chunks=0,32,64  # in groups
    python scripts/benchmark.py --workload=devices --host_devices=8   # 1, 2, 4, 8 devices
    python scripts/benchmark.py --workload=w1 --host_devices=4        # W1 on the CPU as 4 devices
    python scripts/benchmark.py --workload=w1 --fused      # W1 with the mlp's fused kernel
    python scripts/benchmark.py --workload=w1 --fused --bf16_hidden   # ... its bf16 middle layer
    python scripts/benchmark.py --workload=compile         # time to the quickstart's first step
    python scripts/benchmark.py --workload=profile         # where W1's time goes, by category

W1: PES (Vicol et al. 2021), the per-parameter MLP optimizer (Metz et al. 2019's; here two
hidden layers of 32 and learned_optimization's 11 timescales, as the peer's MLPLOpt), 5
momenta and 11 time features, 8 antithetic pairs (16 particles), truncation 20, horizon 200, a
digits MLP 64-32-10 with batch 128, meta-optimizer Adam(1e-3). ``--repeats`` runs each
measurement that many times (fresh trainer, compiled once) and prints min/median/max.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _xla_flags_from_argv(argv: list[str]) -> None:
    """XLA_FLAGS must be set before JAX starts, so read the flags that need it by hand first:
    forced host devices, and the HLO dump that ``--workload=profile`` names kernels from."""
    for a in argv:
        if a.startswith("--host_devices="):
            n = int(a.split("=", 1)[1])
            if n > 1:
                os.environ["XLA_FLAGS"] = (
                    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
                )
        if a == "--workload=profile":
            import tempfile

            os.environ["LOPT_PROFILE_DIR"] = tempfile.mkdtemp(prefix="lopt_profile_")
            os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + (
                f" --xla_dump_to={os.environ['LOPT_PROFILE_DIR']}/hlo --xla_dump_hlo_as_text"
                " --xla_dump_hlo_pass_re=^$")


_xla_flags_from_argv(sys.argv)

import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import estimators  # noqa: E402
import lopt  # noqa: E402
import tasks  # noqa: E402
from estimators import schedules  # noqa: E402
from lopt.training import MetaTrainer  # noqa: E402
from lopt.training.distributed import particle_mesh  # noqa: E402

WORKLOADS = ("w1", "estimators", "particles", "devices", "compile", "profile")
flags.DEFINE_enum("workload", "w1", WORKLOADS, "What to measure (module docstring).")
flags.DEFINE_integer("host_devices", 1, "Run the CPU as this many devices (read before JAX "
                     "starts); every workload but `devices` shards its particles over all of them.")
flags.DEFINE_integer("steps", 10, "Timed outer steps (after two untimed ones).")
flags.DEFINE_integer("repeats", 3, "Measurements per row (min/median/max).")
flags.DEFINE_string("lopt", "mlp", "Learned optimizer of W1 (e.g. hyper_adam to time the rest).")
flags.DEFINE_bool("fused", None, "W1's mlp with fused=True (on a CPU its C++ kernel, "
                  "lopt/mlp_cpu.py; on a GPU its Pallas kernel, lopt/mlp_fused.py) or, with "
                  "--nofused, fused=False; unset: the mlp's default, fused='auto' (the C++ "
                  "kernel on a CPU, unfused on a GPU: lopt/execution.py).")
flags.DEFINE_bool("bf16_hidden", False, "With --fused on a CPU: the mlp's middle hidden layer in "
                  "bfloat16 products with float32 sums (an approximation; lopt/mlp_cpu.py).")
flags.DEFINE_integer("particles", 16, "Particles of W1 in `w1` and `profile` (W1 itself: 16).")
flags.DEFINE_list("particle_chunks", ["0"], "`particles`: one row per value of the unroll's "
                  "particle_chunk (groups of this many particles run one after another; 0: all "
                  "at once); `w1` and `profile`: the first value.")
flags.DEFINE_list("particle_counts", ["16", "32", "64", "128", "256"], "`particles`: the columns.")
FLAGS = flags.FLAGS


def w1_trainer(estimator: str = "pes", num_particles: int = 16, mesh: Mesh | str = "all",
               particle_chunk: int | None = None, **lopt_kwargs) -> MetaTrainer:
    """W1's trainer; ``mesh="all"`` shards the particles over every device (``--host_devices=N``
    runs the CPU as N devices, as the train command's ``--cpu_devices``)."""
    fused = "auto" if FLAGS.fused is None else FLAGS.fused
    lo = (dict(hidden_size=32, hidden_layers=2, fused=fused, bf16_hidden=FLAGS.bf16_hidden)
          if FLAGS.lopt == "mlp" else {})
    lo.update(lopt_kwargs)
    est = {} if estimator == "tbptt" else dict(std=0.01)
    return MetaTrainer.create(
        task_family=tasks.get("digits_mlp", hidden_sizes=(32,), batch_size=128, permute_classes=True),
        learned_opt=lopt.get(FLAGS.lopt, **lo),
        estimator=estimators.get(estimator, **est),
        meta_optimizer=optax.adam(1e-3),
        num_particles=num_particles,
        trunc_length=20,
        horizon=schedules.constant(200),
        mesh=particle_mesh() if isinstance(mesh, str) else mesh,
        particle_chunk=particle_chunk if particle_chunk is not None else int(FLAGS.particle_chunks[0]),
    )


def measure(make) -> tuple[list[float], float]:
    """(inner steps/s of each repeat, seconds to the first two outer steps of the first)."""
    rates, first = [], None
    for _ in range(FLAGS.repeats):
        trainer = make()
        t0 = time.perf_counter()
        state = trainer.init(jax.random.PRNGKey(0))
        for _ in range(2):  # compile, and one more (first-call effects)
            state, _ = trainer.step(state)
        jax.block_until_ready(state)
        first = first if first is not None else time.perf_counter() - t0
        t = time.perf_counter()
        inner = 0
        for _ in range(FLAGS.steps):
            state, metrics = trainer.step(state)
            inner += metrics["inner_steps"]
        jax.block_until_ready(state)
        rates.append(int(inner) / (time.perf_counter() - t))
    return rates, first


def _fmt(rates: list[float]) -> str:
    return f"{min(rates):>9,.0f} {statistics.median(rates):>9,.0f} {max(rates):>9,.0f}"


HEAD = f"{'min':>9} {'median':>9} {'max':>9}  inner steps/s"


def profile_w1(outer_steps: int = 10) -> None:
    """``jax.profiler`` trace of W1's outer steps (after warm-up), its XLA:CPU kernels summed by
    category. A kernel's category comes from its output shape and op_name in the optimised HLO:
    random numbers (threefry, and the bodies of rolled loops: kernels run 5x per step), the
    per-coordinate MLP (outputs over all 2,410 coordinates; with ``--fused`` the C++ kernel's
    calls instead), momenta and second-moment features,
    the task (batch of 128: gather, forward, backward), bookkeeping selects, the rest."""
    import collections
    import glob
    import gzip
    import json
    import re

    out = os.environ["LOPT_PROFILE_DIR"]
    trainer = w1_trainer(num_particles=FLAGS.particles)
    state = trainer.init(jax.random.PRNGKey(0))
    for _ in range(3):
        state, _ = trainer.step(state)
    jax.block_until_ready(state)
    with jax.profiler.trace(os.path.join(out, "trace"), create_perfetto_trace=True):
        t = time.perf_counter()
        for _ in range(outer_steps):
            state, _ = trainer.step(state)
        jax.block_until_ready(state)
        wall = time.perf_counter() - t
    trace = sorted(glob.glob(os.path.join(out, "trace", "**", "*.trace.json.gz"), recursive=True))[-1]
    events = [e for e in json.load(gzip.open(trace))["traceEvents"] if e.get("ph") == "X"]
    hlo = "\n".join(open(f).read() for f in glob.glob(os.path.join(out, "hlo", "*jit__step.cpu_after_optimizations.txt")))
    kernels = {}
    for m in re.finditer(r"^\s+(?:ROOT )?%(\S+) = (\S+) (.*)$", hlo, re.M):
        op = re.search(r'op_name="([^"]*)"', m.group(3))
        kernels.setdefault(m.group(1), (m.group(2), op.group(1) if op else ""))
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        total[e["name"]] += e["dur"]
        count[e["name"]] += 1
    inner = outer_steps * 20

    def category(name: str) -> str:
        shape, op = kernels.get(name, ("?", ""))
        if count[name] >= 5 * inner or name.startswith("while") or any(
                k in op for k in ("threefry", "_uniform", "_normal", "remainder")):
            return "random numbers"
        if "2410" in shape:
            return "learned optimizer: per-coordinate MLP"
        if "ffi_call" in op:  # --fused: the C++ kernel, one call per leaf
            return "learned optimizer: fused kernel (momenta, features, MLP)"
        if re.search(r",5\]|,1\]\{", shape) or "reduce-window" in name or "square" in op or "rsqrt" in op:
            return "learned optimizer: momenta, second-moment features"
        if ",128" in shape or any(k in op for k in ("jvp", "scatter", "gather")):
            return "task: batch gather, forward, backward"
        if "select" in name or "_where" in op:
            return "unroll bookkeeping (selects)"
        return "other"

    skip = ("$", "end:", "Thunk", "Threadpool", "Slinky", "Pjit", "Execute", "ParseArguments", "Wait ")
    by, n_kernels = collections.Counter(), collections.Counter()
    for name, dur in total.items():
        if not name.startswith(skip):
            by[category(name)] += dur
            n_kernels[category(name)] += count[name]
    op_time = sum(by.values())
    print(f"W1 ({FLAGS.particles} particles), {outer_steps} outer steps under jax.profiler: "
          f"{wall * 1e3:.0f} ms wall "
          f"({inner * FLAGS.particles / wall:,.0f} inner steps/s), {op_time / 1e3:.0f} ms of kernel time, "
          f"{sum(n_kernels.values()) / inner:.0f} kernels per inner step")
    print(f"| {'category':<52} | {'ms':>6} | {'share':>5} | kernels/step |")
    for cat, dur in by.most_common():
        print(f"| {cat:<52} | {dur / 1e3:6.0f} | {100 * dur / op_time:4.0f}% | {n_kernels[cat] / inner:12.0f} |")
    print(f"(trace and HLO: {out})")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    dev = jax.devices()[0]
    print(f"backend {jax.default_backend()} ({dev.device_kind}), {jax.device_count()} devices, "
          f"jax {jax.__version__}")
    if FLAGS.workload != "devices" and jax.device_count() > 1:
        print(f"particles sharded over all {jax.device_count()} devices")
    if FLAGS.workload == "w1":
        rates, first = measure(lambda: w1_trainer(num_particles=FLAGS.particles))
        print(f"W1 ({FLAGS.lopt}): {HEAD}\n    {_fmt(rates)}   first two outer steps: {first:.1f} s")
    elif FLAGS.workload == "estimators":
        print(f"{'estimator':<10} {HEAD}")
        for name in ("tbptt", "es", "pes", "merged", "full_es"):
            rates, _ = measure(lambda: w1_trainer(name))
            print(f"{name:<10} {_fmt(rates)}")
    elif FLAGS.workload == "particles":
        counts = [int(p) for p in FLAGS.particle_counts]
        rows = {}
        for c in (int(c) for c in FLAGS.particle_chunks):
            print(f"particle_chunk {c or 'off'}\n{'particles':<10} {HEAD}")
            for p in counts:  # a chunk at or above the count is one group: the unchunked run
                rates, _ = measure(lambda: w1_trainer("pes", p, particle_chunk=c if c < p else 0))
                rows.setdefault(c, []).append(statistics.median(rates))
                print(f"{p:<10} {_fmt(rates)}")
        base = rows[next(iter(rows))][0]
        print(f"\nmedians, inner steps/s (and / the first row's {counts[0]}-particle median):")
        print("| particle_chunk | " + " | ".join(map(str, counts)) + " |")
        print("| --- |" + " ---: |" * len(counts))
        for c, meds in rows.items():
            cells = [f"{m:,.0f} ({m / base:.2f}x)" for m in meds]
            print(f"| {c or 'off'} | " + " | ".join(cells) + " |")
    elif FLAGS.workload == "devices":
        print(f"{'devices':<8}{'particles':>10} {HEAD}")
        for n in (1, 2, 4, 8):
            if n > jax.device_count():
                break
            mesh = Mesh(np.asarray(jax.devices()[:n]), ("particles",))
            rates, _ = measure(lambda: w1_trainer("pes", 16 * n, mesh))
            print(f"{n:<8}{16 * n:>10} {_fmt(rates)}   (weak scaling: 16 per device)")
    elif FLAGS.workload == "profile":
        profile_w1()
    else:  # compile: time to the quickstart's first outer step
        import importlib.util

        from lopt.training import config as config_lib

        spec = importlib.util.spec_from_file_location("qs", os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "quickstart.py"))
        qs = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(qs)
        times = []
        for _ in range(FLAGS.repeats):
            jax.clear_caches()
            t0 = time.perf_counter()
            trainer = config_lib.build(qs.get_config())
            state = trainer.init(jax.random.PRNGKey(0))
            state, _ = trainer.step(state)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - t0)
        print(f"quickstart: time to the first outer step (build, init, compile, run) "
              f"min {min(times):.1f} s, median {statistics.median(times):.1f} s, max {max(times):.1f} s")


if __name__ == "__main__":
    app.run(main)
