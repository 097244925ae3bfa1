"""Runs in a subprocess with 8 forced host devices (see tests/test_sharding.py); prints JSON.

Kept out of the main test process because XLA_FLAGS=--xla_force_host_platform_device_count=8
must be set before JAX starts and slows single-device code.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
import optax
from jax.sharding import Mesh

import estimators
import lopt
import tasks
from estimators import schedules
from estimators.resets import ELOReplay
from lopt.training.checkpoint import Checkpointer
from lopt.training import MetaTrainer


def trainer(ndev: int | None, estimator: str = "pes") -> MetaTrainer:
    mesh = None if ndev is None else Mesh(np.asarray(jax.devices()[:ndev]), ("particles",))
    extra = {}
    fused = estimator.endswith("_fused")  # the mlp's fused CPU kernel (hidden width 16 for it)
    estimator = estimator.removesuffix("_fused")
    if estimator == "es_replay":  # ELO's one buffer for the run, replicated on every device
        estimator, extra = "es", dict(reset=ELOReplay(capacity=12, p_threshold=0.3))
    return MetaTrainer.create(
        task_family=tasks.get("digits_mlp", hidden_sizes=(8,), batch_size=16, permute_classes=True),
        learned_opt=lopt.get("mlp", hidden_size=16 if fused else 8, hidden_layers=1, fused=fused),
        estimator=estimators.get(estimator, **({} if estimator == "tbptt" else {"std": 0.01})),
        meta_optimizer=optax.adam(1e-3),
        num_particles=16,
        trunc_length=4,
        horizon=schedules.constant(10),
        mesh=mesh,
        **extra,
    )


#: Per (trainer, steps) run: whether init's and every step's outputs were computed when the
#: call returned (MetaTrainer waits on several CPU devices; see ``_one_call_at_a_time``).
SETTLED: list[bool] = []


def run(t: MetaTrainer, steps: int, state=None):
    def ready(tree) -> bool:
        return all(x.is_ready() for x in jax.tree.leaves(tree))

    settled = []
    if state is None:
        state = t.init(jax.random.PRNGKey(0))
        settled.append(ready(state))
    for _ in range(steps):
        state, metrics = t.step(state)
        settled.append(ready((state, metrics)))
    SETTLED[:] = settled
    return state, metrics


def flat(tree) -> list[float]:
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)]).tolist()


def determinism(estimator: str, counts: str) -> dict:
    out = {}
    for ndev in [None] + [int(c) for c in counts.split(",")]:
        state, metrics = run(trainer(ndev, estimator), 3)
        out[str(ndev)] = {
            "meta_params": flat(state.meta_params),
            "meta_loss": float(metrics["meta_loss"]),
            "inner_steps": int(metrics["inner_steps"]),
            "shards": len(jax.tree.leaves(state.estimator_state.unroll.particles)[0].sharding.device_set),
            "position_max": float(metrics["position_max"]),
            "settled": list(SETTLED),
        }
    return out


def checkpoint_8_to_4(workdir: str) -> dict:
    t8, t4 = trainer(8), trainer(4)
    reference, _ = run(t8, 4)
    state8, _ = run(t8, 2)
    ckpt = Checkpointer(workdir)
    ckpt.save(2, {"state": state8})
    ckpt.wait()
    restored = ckpt.restore(2, {"state": t4.init(jax.random.PRNGKey(1))})[0]["state"]
    devices = len(jax.tree.leaves(restored.estimator_state.unroll.particles)[0].sharding.device_set)
    continued, _ = run(t4, 2, restored)
    return {
        "reference": flat(reference.meta_params),
        "continued": flat(continued.meta_params),
        "restored_devices": devices,
        "outer_step": int(continued.outer_step),
    }


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    what = sys.argv[1]
    if what == "determinism":
        result = determinism(sys.argv[2], sys.argv[3])
    else:
        result = checkpoint_8_to_4(sys.argv[2])
    print("RESULT " + json.dumps(result))
