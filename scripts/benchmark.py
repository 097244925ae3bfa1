"""Meta-training throughput benchmarks.

    python scripts/benchmark.py --scaling --host_devices=8

``--scaling``: inner steps per second (particles x inner steps / wall time) and outer steps per
second on 1, 2, 4 and 8 devices, at a fixed number of particles per device (weak scaling) and a
fixed total (strong scaling), with efficiency ratios. On CPU, ``--host_devices`` forces that many
XLA host devices (they share the machine's cores, so CPU efficiency measures overhead, not
speed-up); on a GPU machine the visible devices are used.
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

flags.DEFINE_bool("scaling", True, "Run the device-scaling benchmark.")
flags.DEFINE_integer("host_devices", 8, "Forced XLA host devices on CPU (read before JAX starts).")
flags.DEFINE_list("devices", ["1", "2", "4", "8"], "Device counts to measure.")
flags.DEFINE_integer("particles_per_device", 4, "Weak scaling: particles on each device.")
flags.DEFINE_integer("total_particles", 32, "Strong scaling: particles in total.")
flags.DEFINE_integer("trunc_length", 10, "Inner steps per truncation.")
flags.DEFINE_integer("steps", 5, "Timed outer steps (after one warm-up step).")
flags.DEFINE_string("estimator", "pes", "Estimator.")
flags.DEFINE_string("task", "digits_mlp", "Task family.")
FLAGS = flags.FLAGS


def measure(num_devices: int, num_particles: int) -> tuple[float, float]:
    """(outer steps/s, inner steps/s) with the particles sharded over ``num_devices``."""
    mesh = Mesh(np.asarray(jax.devices()[:num_devices]), ("particles",))
    trainer = MetaTrainer.create(
        task_family=tasks.get(FLAGS.task),
        learned_opt=lopt.get("mlp"),
        estimator=estimators.get(FLAGS.estimator),
        meta_optimizer=optax.adam(1e-3),
        num_particles=num_particles,
        trunc_length=FLAGS.trunc_length,
        horizon=schedules.constant(200),
        mesh=mesh,
    )
    state = trainer.init(jax.random.PRNGKey(0))
    state, _ = trainer.step(state)  # compile
    jax.block_until_ready(state)
    t = time.perf_counter()
    for _ in range(FLAGS.steps):
        state, metrics = trainer.step(state)
    jax.block_until_ready(state)
    dt = time.perf_counter() - t
    inner = int(metrics["inner_steps"]) * FLAGS.steps
    return FLAGS.steps / dt, inner / dt


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    counts = [int(c) for c in FLAGS.devices if int(c) <= jax.device_count()]
    print(f"backend {jax.default_backend()}, {jax.device_count()} devices "
          f"({jax.devices()[0].device_kind}); estimator {FLAGS.estimator}, task {FLAGS.task}, "
          f"truncation {FLAGS.trunc_length}")
    header = f"{'mode':<7}{'devices':>8}{'particles':>10}{'outer/s':>10}{'inner/s':>11}{'efficiency':>12}"
    print(header)
    print("-" * len(header))
    for mode in ("weak", "strong"):
        base = None
        for n in counts:
            particles = FLAGS.particles_per_device * n if mode == "weak" else FLAGS.total_particles
            if particles % n or (particles // n) % 2:
                print(f"{mode:<7}{n:>8}{particles:>10}   skipped (particles per device must be even)")
                continue
            outer_rate, inner_rate = measure(n, particles)
            if base is None:
                base = (n, inner_rate, outer_rate)
            if mode == "weak":  # throughput should grow with devices
                eff = inner_rate / (base[1] * n / base[0])
            else:  # the same work should finish n times faster
                eff = outer_rate / (base[2] * n / base[0])
            print(f"{mode:<7}{n:>8}{particles:>10}{outer_rate:>10.2f}{inner_rate:>11,.0f}{eff:>12.2f}")


if __name__ == "__main__":
    app.run(main)
