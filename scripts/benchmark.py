"""Meta-training throughput benchmarks (inner steps per second = particles x inner steps / wall
time, compile excluded), printed as tables.

    python scripts/benchmark.py --workload=w1              # W1: the issue's reference workload
    python scripts/benchmark.py --workload=estimators      # every estimator on W1's task
    python scripts/benchmark.py --workload=particles       # particles 16 -> 256 on one device
    python scripts/benchmark.py --workload=devices --host_devices=8   # 1, 2, 4, 8 devices
    python scripts/benchmark.py --workload=compile         # time to the quickstart's first step

W1: PES (Vicol et al. 2021), the Metz et al. 2019 MLP optimizer with two hidden layers of 32, 5
momenta and 11 time features, 8 antithetic pairs (16 particles), truncation 20, horizon 200, a
digits MLP 64-32-10 with batch 128, meta-optimizer Adam(1e-3). ``--repeats`` runs each
measurement that many times (fresh trainer, compiled once) and prints min/median/max.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _force_host_devices(argv: list[str]) -> None:
    """XLA_FLAGS must be set before JAX starts, so read the flag by hand first."""
    for a in argv:
        if a.startswith("--host_devices="):
            n = int(a.split("=", 1)[1])
            if n > 1:
                os.environ["XLA_FLAGS"] = (
                    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
                )


_force_host_devices(sys.argv)

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

WORKLOADS = ("w1", "estimators", "particles", "devices", "compile")
flags.DEFINE_enum("workload", "w1", WORKLOADS, "What to measure (module docstring).")
flags.DEFINE_integer("host_devices", 1, "Forced XLA host devices on CPU (read before JAX starts).")
flags.DEFINE_integer("steps", 10, "Timed outer steps (after two untimed ones).")
flags.DEFINE_integer("repeats", 3, "Measurements per row (min/median/max).")
flags.DEFINE_string("lopt", "mlp", "Learned optimizer of W1 (e.g. hyper_adam to time the rest).")
FLAGS = flags.FLAGS


def w1_trainer(estimator: str = "pes", num_particles: int = 16, mesh=None, **lopt_kwargs) -> MetaTrainer:
    lo = dict(hidden_size=32, hidden_layers=2) if FLAGS.lopt == "mlp" else {}
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
        mesh=mesh,
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


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    dev = jax.devices()[0]
    print(f"backend {jax.default_backend()} ({dev.device_kind}), {jax.device_count()} devices, "
          f"jax {jax.__version__}")
    if FLAGS.workload == "w1":
        rates, first = measure(w1_trainer)
        print(f"W1 ({FLAGS.lopt}): {HEAD}\n    {_fmt(rates)}   first two outer steps: {first:.1f} s")
    elif FLAGS.workload == "estimators":
        print(f"{'estimator':<10} {HEAD}")
        for name in ("tbptt", "es", "pes", "merged", "full_es"):
            rates, _ = measure(lambda: w1_trainer(name))
            print(f"{name:<10} {_fmt(rates)}")
    elif FLAGS.workload == "particles":
        print(f"{'particles':<10} {HEAD}")
        for p in (16, 32, 64, 128, 256):
            rates, _ = measure(lambda: w1_trainer("pes", p))
            print(f"{p:<10} {_fmt(rates)}")
    elif FLAGS.workload == "devices":
        print(f"{'devices':<8}{'particles':>10} {HEAD}")
        for n in (1, 2, 4, 8):
            if n > jax.device_count():
                break
            mesh = Mesh(np.asarray(jax.devices()[:n]), ("particles",))
            rates, _ = measure(lambda: w1_trainer("pes", 16 * n, mesh))
            print(f"{n:<8}{16 * n:>10} {_fmt(rates)}   (weak scaling: 16 per device)")
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
