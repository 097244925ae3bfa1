"""W1 throughput benchmark on google/learned_optimization (peer comparison).

W1: PES meta-training of l_o's MLPLOpt (hidden_size=32, hidden_layers=2),
8 antithetic pairs = 16 unrolled trajectories, truncation 20 inner steps,
trajectory length 200, on a 64-32(ReLU)-10 MLP on sklearn 8x8 digits
(flattened, /16 -> [0,1]), softmax cross-entropy, batch 128, data in memory,
meta-optimizer Adam(1e-3).

Figure: inner steps/s = timed outer steps x 16 x 20 / seconds, excluding the
first two outer steps (compile), which are reported separately.

Data modes (--data):
  jit   (default) Task.datasets = None; the digits live in a jnp array captured
        by the loss, and each inner step samples 128 indices with the per-step
        key l_o hands to Task.loss (antithetic pairs get the same key, hence the
        same batch). No host work per step.
  numpy Task.datasets = l_o Datasets whose splits are in-memory numpy
        iterators; l_o's TruncatedPES.get_batch pulls 20 x 8 batches on the host
        per outer step (l_o's native data path).
"""
import argparse
import os
import statistics
import sys
import time

# ---- shims (see report) ----------------------------------------------------
# TF (imported by l_o's summary.py / filesystem.py / tasks/datasets/base.py)
# must not grab the CPU threads or log noise; none of its ops run here.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import warnings  # noqa: E402
# l_o donates buffers XLA:CPU cannot reuse; the warning is noise.
warnings.filterwarnings("ignore", message="Some donated buffers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as onp  # noqa: E402

# No jax API shim is needed: every l_o module on this path already uses
# jax.tree_util.* (no jax.tree_multimap / jax.tree_map) and runs on jax 0.10.2.

import haiku as hk  # noqa: E402
from learned_optimization.learned_optimizers import mlp_lopt  # noqa: E402
from learned_optimization.optimizers import optax_opts  # noqa: E402
from learned_optimization.outer_trainers import gradient_learner  # noqa: E402
from learned_optimization.outer_trainers import lopt_truncated_step  # noqa: E402
from learned_optimization.outer_trainers import truncated_pes  # noqa: E402
from learned_optimization.outer_trainers import truncation_schedule  # noqa: E402
from learned_optimization.tasks import base as tasks_base  # noqa: E402
from learned_optimization.tasks.datasets import base as datasets_base  # noqa: E402

BATCH = 128
NUM_PAIRS = 8  # l_o num_tasks: antithetic pairs; each pair = 2 unrolls
UNROLLS = 2 * NUM_PAIRS
TRUNC = 20
HORIZON = 200


def load_digits():
  from sklearn.datasets import load_digits as _ld  # pylint: disable=g-import-not-at-top
  d = _ld()
  x = (d.data.astype(onp.float32) / 16.0).reshape(-1, 64)
  y = d.target.astype(onp.int32)
  return x, y


def _forward(inp):
  return hk.nets.MLP([32, 10], activation=jax.nn.relu)(inp)


_mod = hk.without_apply_rng(hk.transform(_forward))


def _xent(logits, labels):
  return jnp.mean(-jnp.sum(jax.nn.one_hot(labels, 10) *
                           jax.nn.log_softmax(logits), axis=-1))


class DigitsMLPJit(tasks_base.Task):
  """Data sampled inside jit from a jnp array captured by the loss."""
  datasets = None

  def __init__(self, x, y):
    self._x = jnp.asarray(x)
    self._y = jnp.asarray(y)

  def init(self, key):
    return _mod.init(key, jnp.zeros([1, 64], jnp.float32))

  def loss(self, params, key, data):
    del data  # () when datasets is None
    idx = jax.random.randint(key, (BATCH,), 0, self._x.shape[0])
    return _xent(_mod.apply(params, self._x[idx]), self._y[idx])


class DigitsMLPNumpy(tasks_base.Task):
  """l_o-native data path: Datasets of in-memory numpy iterators."""

  def __init__(self, x, y, seed=0):
    rng = onp.random.RandomState(seed)

    def it():
      while True:
        idx = rng.randint(0, x.shape[0], size=BATCH)
        yield {"image": x[idx], "label": y[idx]}

    abstract = {"image": jax.ShapeDtypeStruct((BATCH, 64), jnp.float32),
                "label": jax.ShapeDtypeStruct((BATCH,), jnp.int32)}
    self.datasets = datasets_base.Datasets(
        train=it(), inner_valid=it(), outer_valid=it(), test=it(),
        extra_info={"num_classes": 10}, abstract_batch=abstract)

  def init(self, key):
    return _mod.init(key, jnp.zeros([1, 64], jnp.float32))

  def loss(self, params, key, data):
    return _xent(_mod.apply(params, data["image"]), data["label"])


def build(data_mode, stack, seed):
  x, y = load_digits()
  task = DigitsMLPJit(x, y) if data_mode == "jit" else DigitsMLPNumpy(x, y)
  task_family = tasks_base.single_task_to_family(task)
  lopt = mlp_lopt.MLPLOpt(hidden_size=32, hidden_layers=2)
  trunc_sched = truncation_schedule.ConstantTruncationSchedule(HORIZON)
  truncated_step = lopt_truncated_step.VectorizedLOptTruncatedStep(
      task_family, lopt, trunc_sched, num_tasks=NUM_PAIRS,
      random_initial_iteration_offset=0)
  grad_est = truncated_pes.TruncatedPES(
      truncated_step=truncated_step, trunc_length=TRUNC, steps_per_jit=TRUNC,
      std=0.01, stack_antithetic_samples=stack)
  theta_opt = optax_opts.Adam(1e-3)  # optax.adam, b1=.9 b2=.999 eps=1e-8 eps_root=1e-8
  learner = gradient_learner.SingleMachineGradientLearner(
      lopt, [grad_est], theta_opt)
  return learner


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--outer_steps", type=int, default=30)
  p.add_argument("--data", choices=["jit", "numpy"], default="jit")
  p.add_argument("--stack", type=int, default=1,
                 help="TruncatedPES stack_antithetic_samples (1: one vmapped "
                 "unroll of 16; 0: l_o default, two serial unrolls of 8)")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  n = args.outer_steps
  assert n > 2

  learner = build(args.data, bool(args.stack), args.seed)
  key = jax.random.PRNGKey(args.seed)
  key, k0 = jax.random.split(key)
  t0 = time.perf_counter()
  state = learner.init(k0)
  jax.block_until_ready(state)
  t_init = time.perf_counter() - t0

  losses = []
  step_times = []
  for i in range(n):
    key, k = jax.random.split(key)
    ts = time.perf_counter()
    state, loss, _ = learner.update(state, k, with_metrics=False)
    jax.block_until_ready((state, loss))
    step_times.append(time.perf_counter() - ts)
    losses.append(float(loss))
  first_two = sum(step_times[:2])
  timed = sum(step_times[2:])
  ips = (n - 2) * UNROLLS * TRUNC / timed
  print(f"# data={args.data} stack={args.stack} init={t_init:.2f}s "
        f"per-step min/med/max={min(step_times[2:])*1e3:.1f}/"
        f"{statistics.median(step_times[2:])*1e3:.1f}/"
        f"{max(step_times[2:])*1e3:.1f} ms; loss first/last="
        f"{losses[0]:.4f}/{losses[-1]:.4f}", file=sys.stderr)
  if os.environ.get("W1_VERBOSE"):
    print("# step times (s):", " ".join(f"{t:.3f}" for t in step_times),
          file=sys.stderr)
    print("# losses:", " ".join(f"{l:.3f}" for l in losses), file=sys.stderr)
  print(f"W1 learned_optimization: {ips:.1f} inner steps/s "
        f"(timed {n-2} outer steps, {timed:.2f} s), "
        f"first two steps {first_two:.2f} s")


if __name__ == "__main__":
  main()
