"""Multi-host meta-training on JAX's own multi-controller runtime.

Every process runs the same program: ``initialize`` joins the processes (coordinator address,
process count and id from arguments, ``LOPT_*`` environment variables, or what JAX detects from
the cluster scheduler: SLURM, Open MPI, ...), the particle axis is sharded over a mesh of
*all* processes' devices, and JAX's collectives average the meta-gradient. Only process 0
writes logs, plots and exports; orbax checkpoints are written cooperatively (each process its
own shards, process 0 the metadata that makes a checkpoint complete).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """``jax.distributed.initialize`` with arguments, ``LOPT_COORDINATOR_ADDRESS``,
    ``LOPT_NUM_PROCESSES`` and ``LOPT_PROCESS_ID``, or the scheduler's variables."""
    env = os.environ
    coordinator_address = coordinator_address or env.get("LOPT_COORDINATOR_ADDRESS")
    if num_processes is None and "LOPT_NUM_PROCESSES" in env:
        num_processes = int(env["LOPT_NUM_PROCESSES"])
    if process_id is None and "LOPT_PROCESS_ID" in env:
        process_id = int(env["LOPT_PROCESS_ID"])
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )


def set_cpu_devices(n: int) -> None:
    """Run the CPU backend as ``n`` devices (JAX's ``jax_num_cpu_devices``), so the particles are
    sharded over ``n`` device programs that run side by side instead of one program whose every
    kernel XLA:CPU splits over the cores. On a 2-core machine, W1's task (16 particles,
    separate processes alternated): TBPTT 1.31x as 2 devices and 1.63x as 4, merged ~1.3x as
    4, PES ~1.2x (README, "Speed on a CPU"). Results do not depend on the device count beyond
    float reduction order.

    Must run before JAX starts a backend (before the first array is made); ``n = 1`` leaves
    JAX's default (one CPU device, or what ``XLA_FLAGS`` force). GPU and TPU runs are
    unaffected: their devices are the accelerators."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"cpu_devices must be an integer >= 1, got {n!r}")
    current = jax.config.jax_num_cpu_devices  # -1: never set (JAX's default, one device)
    if int(n) == current or (n == 1 and current == -1):
        return
    try:
        jax.config.update("jax_num_cpu_devices", int(n))
    except RuntimeError:
        raise ValueError(
            f"cpu_devices={n}: JAX has already started its backends in this process; set it "
            f"before the first JAX operation (a fresh process)"
        ) from None


def is_primary() -> bool:
    """True on the process that writes logs, plots and exports."""
    return jax.process_index() == 0


def particle_mesh(num_devices: int = 0, axis: str = "particles") -> Mesh | None:
    """A 1-D mesh over the first ``num_devices`` global devices (0: all); None for one device."""
    devices = jax.devices()
    n = len(devices) if num_devices in (0, None) else num_devices
    if n > len(devices):
        raise ValueError(f"num_devices={n} but only {len(devices)} devices are visible")
    return None if n == 1 else Mesh(np.asarray(devices[:n]), (axis,))


def to_host(tree: Any) -> Any:
    """Numpy copies of replicated (or single-process) arrays, on any process."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    return jax.tree.map(one, tree)
