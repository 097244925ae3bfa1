"""Threefry-2x32 on CPU as straight-line code instead of JAX's rolled loop: same bits, fewer
kernels per inner step, faster compiles.

Every random number here (``jax.random`` with its default implementation) is a Threefry-2x32
hash (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011,
Sec. 4: 20 rounds of add/rotate/xor, a key injection every 4 rounds). On CPU, JAX lowers the
hash as a ``fori_loop`` over the 5 groups of 4 rounds (a smaller program). Under XLA:CPU's thunk
runtime every iteration of that loop runs as separate small kernels plus copies of the loop
state, and an inner step draws several times (its batch indices, its meta-loss batch, the
end-of-trajectory key), so in W1 (``scripts/benchmark.py --workload=profile``) the loops were 190
of the 410 kernels an inner step ran, and every draw's loop is compiled on its own.

:func:`install` registers, for the CPU platform only, a lowering of JAX's public
``threefry2x32_p`` primitive as the 20 rounds written out, which XLA fuses into the draw's
consumers. The hash is the same function, so every key, batch, perturbation and reset is
bit-identical with or without it (tests/estimators/test_threefry.py checks the Random123
known-answer vectors and equality with JAX's own lowering in a subprocess). Measured (2-core CPU,
the two lowerings alternated): W1's first two outer steps 15.5 -> 10.1 s and 15.2 -> 9.4 s, the
quickstart's first outer step 14.8 -> 9.0 s (median of 2); W1's throughput moved within this
VM's process-to-process noise (0.9-1.15x).

Nothing installs it on import. The training layer installs it when a ``MetaTrainer`` is built
(``lopt.training.trainer``), the place that compiles inner loops; it changes how, not what, the
process computes, for every later compile on CPU. Set ``LOPT_THREEFRY=rolled`` in the
environment to keep JAX's lowering (e.g. to compare), or call :func:`install` yourself to get it
without a trainer.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry2x32_p
from jax.interpreters import mlir

#: Rotation distances of Threefry-2x32 (Salmon et al. 2011, Table 4), rounds 0-3 and 4-7 of
#: each 8, used alternately by the 5 groups of 4 rounds.
ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
#: The key-schedule parity constant of Threefish/Threefry (Salmon et al. 2011, Sec. 4.1).
PARITY = 0x1BD11BDA

_installed = False


def _rotl(x: jnp.ndarray, d: int) -> jnp.ndarray:
    return (x << np.uint32(d)) | (x >> np.uint32(32 - d))


def threefry2x32(k0, k1, x0, x1):
    """The 20-round Threefry-2x32 hash of counters (x0, x1) under key (k0, k1), uint32 arrays,
    written out: 5 groups of 4 rounds (x0 += x1; x1 = rotl(x1, r) ^ x0), each followed by the
    injection of key word s + 1 and s + 2 (mod 3) and the group counter s + 1."""
    ks = (k0, k1, k0 ^ k1 ^ np.uint32(PARITY))
    x0 = x0 + ks[0]
    x1 = x1 + ks[1]
    for s in range(5):
        for r in ROTATIONS[s % 2]:
            x0 = x0 + x1
            x1 = _rotl(x1, r) ^ x0
        x0 = x0 + ks[(s + 1) % 3]
        x1 = x1 + ks[(s + 2) % 3] + np.uint32(s + 1)
    return x0, x1


def _lowering(k0, k1, x0, x1):
    # The primitive broadcasts its operands (batching.defbroadcasting): do it here too.
    shape = np.broadcast_shapes(*(jnp.shape(a) for a in (k0, k1, x0, x1)))
    return list(threefry2x32(*(jnp.broadcast_to(a, shape) for a in (k0, k1, x0, x1))))


def install() -> bool:
    """Register the unrolled CPU lowering (once; a no-op with ``LOPT_THREEFRY=rolled``).
    Returns whether it is installed."""
    global _installed
    if _installed:
        return True
    mode = os.environ.get("LOPT_THREEFRY", "unrolled")
    if mode == "rolled":
        return False
    if mode != "unrolled":
        raise ValueError(f"LOPT_THREEFRY must be 'unrolled' or 'rolled', got {mode!r}")
    mlir.register_lowering(threefry2x32_p, mlir.lower_fun(_lowering, multiple_results=True), platform="cpu")
    _installed = True
    return True
