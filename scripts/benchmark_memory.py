"""Peak memory of a TBPTT meta-gradient against the truncation length T.

    python scripts/benchmark_memory.py --lengths=100,1000

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


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
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
