"""estimators/threefry.py: the unrolled CPU lowering computes JAX's Threefry-2x32 bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
from jax.extend.random import threefry_2x32

from estimators import threefry

# Random123's known-answer vectors for threefry2x32_20 (key, counter, result).
KAT = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
]

# Draws of every kind the framework makes (split, fold_in, bits, uniform, normal, permutation,
# under vmap), printed as uint32 words.
DRAWS = r"""
import sys, jax, jax.numpy as jnp, numpy as np
from estimators import threefry
threefry.install()
def draws(k):
    ks = jax.random.split(k, 4)
    return [ks, jax.random.fold_in(k, 0xF2E5), jax.random.bits(k, (37,), jnp.uint32),
            jax.random.uniform(ks[0], (5, 3)), jax.random.normal(ks[1], (11,)),
            jax.random.permutation(ks[2], 10), jax.vmap(lambda kk: jax.random.normal(kk, (2,)))(ks)]
out = jax.jit(draws)(jax.random.PRNGKey(20261130))
sys.stdout.write(" ".join(str(int(w)) for x in out for w in np.asarray(x).ravel().view(np.uint32)))
"""


def test_known_answer_vectors():
    assert threefry.install()  # idempotent
    for key, ctr, expected in KAT:
        got = jax.jit(threefry_2x32)(np.uint32(key), np.uint32(ctr))
        assert [int(v) for v in got] == list(expected)
        # the straight-line function itself, outside any lowering
        words = threefry.threefry2x32(*(np.uint32(v) for v in (*key, *ctr)))
        assert [int(v) for v in words] == list(expected)


def test_same_bits_as_jax_lowering():
    """Every kind of draw is bit-identical to JAX's own (rolled) CPU lowering."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def run(mode):
        env = dict(os.environ, LOPT_THREEFRY=mode, JAX_PLATFORMS="cpu")
        return subprocess.run([sys.executable, "-c", DRAWS], cwd=root, env=env, check=True,
                              capture_output=True, text=True).stdout.split()

    unrolled, rolled = run("unrolled"), run("rolled")
    assert len(unrolled) == 91  # every draw above, as 32-bit words
    assert unrolled == rolled


IMPORTS = r"""
import sys
from jax._src.interpreters import mlir
from jax.extend.random import threefry2x32_p
before = mlir._platform_specific_lowerings["cpu"].get(threefry2x32_p)
import estimators, lopt, tasks, lopt.training
after_import = mlir._platform_specific_lowerings["cpu"].get(threefry2x32_p)
import optax
from estimators import schedules
lopt.training.MetaTrainer.create(task_family=tasks.get("quadratic"), learned_opt=lopt.get("hyper_adam"),
    estimator=estimators.get("tbptt"), meta_optimizer=optax.adam(1e-3), num_particles=2,
    trunc_length=2, horizon=schedules.constant(4))
after_trainer = mlir._platform_specific_lowerings["cpu"].get(threefry2x32_p)
sys.stdout.write(f"{after_import is before} {after_trainer is before}")
"""


def test_importing_the_packages_leaves_jax_as_it_was():
    """No side effect on import (DESIGN.md: nothing runs on import, no patching of JAX): the
    CPU lowering of JAX's Threefry primitive is JAX's own after ``import estimators, lopt,
    tasks, lopt.training``; building a MetaTrainer installs ours, unless LOPT_THREEFRY=rolled."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def run(**env):
        return subprocess.run([sys.executable, "-c", IMPORTS], cwd=root, check=True, text=True,
                              capture_output=True, env=dict(os.environ, JAX_PLATFORMS="cpu", **env)).stdout

    assert run(LOPT_THREEFRY="unrolled") == "True False"
    assert run(LOPT_THREEFRY="rolled") == "True True"
