"""Peak memory of a TBPTT meta-gradient against the truncation length T, and of one W1 outer
step against the unroll's ``particle_chunk``.

    python scripts/benchmark_memory.py --lengths=100,1000
    python scripts/benchmark_memory.py --particle_chunks=0,64,16 --particles=256

For each T, compiles one ``tbptt`` gradient (digits_mlp task, mlp optimizer) with and without
``jax.checkpoint`` and prints XLA's own accounting of the compiled program's temporary buffers
(``compiled.memory_analysis()``), i.e. the peak working memory beyond inputs and outputs.
Nothing is executed, so the figures are exact and the script is quick on any backend.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import logging  # noqa: E402
from absl import app, flags  # noqa: E402

import estimators  # noqa: E402
import lopt  # noqa: E402
import tasks  # noqa: E402
from estimators import schedules  # noqa: E402
from estimators.unroll import Unroller  # noqa: E402
from tasks.base import bind_data, data_arrays  # noqa: E402

_LENGTHS = flags.DEFINE_list("lengths", ["100", "1000"], "Truncation lengths T.")
_PARTICLES = flags.DEFINE_integer("particles", 4, "Particles.")
_HIDDEN = flags.DEFINE_integer("hidden", 32, "Hidden units of the digits MLP task.")
_CHUNKS = flags.DEFINE_list("particle_chunks", [], "Instead of the T table: one W1 outer step "
                            "(scripts/benchmark.py's trainer, --particles particles) per "
                            "estimator of --estimators and per value of the unroll's "
                            "particle_chunk (0: all particles in one group).")
_ESTIMATORS = flags.DEFINE_list("estimators", ["pes", "tbptt"], "With --particle_chunks.")


def peak_bytes(length: int, checkpoint: bool) -> int:
    family = tasks.get("digits_mlp", hidden_sizes=(_HIDDEN.value,))
    learned = lopt.get("mlp")
    unroller = Unroller(family, learned, _PARTICLES.value, length, schedules.constant(10 * length))
    tb = estimators.get("tbptt", checkpoint=checkpoint)
    theta = learned.init(jax.random.PRNGKey(0))

    def grad(theta, state, key, arrays):
        u = Unroller(bind_data(family, arrays), learned, unroller.num_particles, length, unroller.horizon)
        return tb.grad(u, theta, state, key)[0]

    state = jax.eval_shape(lambda: tb.init(unroller, jax.random.PRNGKey(0), theta))
    compiled = jax.jit(grad).lower(theta, state, jax.random.PRNGKey(0), data_arrays(family)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def step_peak_bytes(estimator: str, chunk: int) -> int:
    """XLA's temporary bytes of one compiled W1 outer step (never run)."""
    import optax

    from lopt.training import MetaTrainer

    trainer = MetaTrainer.create(
        task_family=tasks.get("digits_mlp", hidden_sizes=(_HIDDEN.value,), batch_size=128,
                              permute_classes=True),
        learned_opt=lopt.get("mlp", hidden_size=32, hidden_layers=2),
        estimator=estimators.get(estimator), meta_optimizer=optax.adam(1e-3),
        num_particles=_PARTICLES.value, trunc_length=20, horizon=schedules.constant(200),
        particle_chunk=chunk)
    state = jax.eval_shape(trainer.init, jax.random.PRNGKey(0))
    compiled = trainer._step_fn.lower(state, data_arrays(trainer.task_family)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if _CHUNKS.value:
        chunks = [int(c) for c in _CHUNKS.value]
        print(f"W1 outer step, peak temporary memory (MiB), {_PARTICLES.value} particles, "
              f"backend {jax.default_backend()}")
        print("| estimator | " + " | ".join(f"particle_chunk {c or 'off'}" for c in chunks) + " |")
        print("| --- |" + " ---: |" * len(chunks))
        for est in _ESTIMATORS.value:
            sizes = [step_peak_bytes(est, c) / 2**20 for c in chunks]
            print(f"| {est} | " + " | ".join(f"{m:,.1f} ({m / sizes[0]:.2f}x)" for m in sizes) + " |")
        return
    print(f"TBPTT peak temporary memory, digits_mlp hidden {_HIDDEN.value}, "
          f"{_PARTICLES.value} particles, backend {jax.default_backend()}")
    print(f"{'T':>6} | {'no checkpoint':>14} | {'sqrt(T) checkpoint':>18} | ratio")
    rows = []
    for t in map(int, _LENGTHS.value):
        plain, ckpt = peak_bytes(t, False), peak_bytes(t, True)
        rows.append((t, plain, ckpt))
        print(f"{t:>6} | {plain / 2**20:>11.2f} MiB | {ckpt / 2**20:>15.2f} MiB | {plain / ckpt:5.1f}x")
    if len(rows) >= 2:
        (t0, p0, c0), (t1, p1, c1) = rows[0], rows[-1]
        print(f"growth from T={t0} to T={t1} ({t1 / t0:.0f}x longer): "
              f"no checkpoint {p1 / p0:.1f}x, checkpointed {c1 / c0:.1f}x")


if __name__ == "__main__":
    app.run(main)
