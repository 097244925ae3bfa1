"""Multi-host meta-training on JAX's own multi-controller runtime.

Every process runs the same program: ``initialize`` joins the processes (coordinator address,
process count and id from arguments, ``LOPT_*`` environment variables, or what JAX detects from
the cluster scheduler: SLURM, Open MPI, ...), the particle axis is sharded over a mesh of
*all* processes' devices, and JAX's collectives average the meta-gradient. Only process 0
writes logs, plots and exports; orbax checkpoints are written cooperatively (each process its
own shards, process 0 the metadata that makes a checkpoint complete).

A lost process (its host died, it was killed) leaves the others waiting in a collective, or
failing in one. JAX's coordination service declares a process dead after
``heartbeat_timeout`` seconds without its heartbeat and then terminates the others itself;
:class:`HostWatch` notices sooner (half that time) and lets the command say so in one line
(docs/distributed.md, "Preemption and lost hosts").
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh


#: Seconds without a heartbeat after which JAX's coordination service declares a process dead
#: (JAX's default is 100); lopt's HostWatch reports it after half of this.
HEARTBEAT_TIMEOUT = 60


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    heartbeat_timeout: int = HEARTBEAT_TIMEOUT,
) -> None:
    """``jax.distributed.initialize`` with arguments, ``LOPT_COORDINATOR_ADDRESS``,
    ``LOPT_NUM_PROCESSES`` and ``LOPT_PROCESS_ID``, or the scheduler's variables; a process
    silent for ``heartbeat_timeout`` seconds is dead to JAX's coordination service."""
    env = os.environ
    coordinator_address = coordinator_address or env.get("LOPT_COORDINATOR_ADDRESS")
    if num_processes is None and "LOPT_NUM_PROCESSES" in env:
        num_processes = int(env["LOPT_NUM_PROCESSES"])
    if process_id is None and "LOPT_PROCESS_ID" in env:
        process_id = int(env["LOPT_PROCESS_ID"])
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id,
        heartbeat_timeout_seconds=int(heartbeat_timeout),
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


def physical_cores() -> int:
    """Physical cores this process may run on: the distinct (physical id, core id) pairs of
    /proc/cpuinfo among the CPUs of its affinity mask (hyperthreads share a core's FMA units),
    at most the cgroup's CPU quota; where those are unknown, the CPUs it may run on."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    count = len(allowed) if allowed else (os.cpu_count() or 1)
    try:
        with open("/proc/cpuinfo") as f:
            cores = cores_in_cpuinfo(f.read(), allowed)
    except OSError:
        cores = 0
    if cores:
        count = min(count, cores)
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            count = min(count, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def cores_in_cpuinfo(text: str, allowed: set[int] | None = None) -> int:
    """The distinct (physical id, core id) pairs of /proc/cpuinfo's ``text`` among the CPUs
    ``allowed`` (all if None): the physical cores, two hyperthreads of one core counted once;
    0 where the text names no core ids (some virtual machines, other architectures)."""
    cores, cpu, package = set(), None, "0"
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "processor":
            cpu, package = int(value), "0"
        elif key == "physical id":
            package = value
        elif key == "core id" and cpu is not None and (allowed is None or cpu in allowed):
            cores.add((package, value))
    return len(cores)


def auto_cpu_devices(num_particles: int, cores: int | None = None) -> int:
    """``--cpu_devices=auto``: the most CPU devices, at most the physical cores, over which
    ``num_particles`` split into whole antithetic pairs (an even count splits by pairs, an odd
    one by particles); 1 with fewer than two pairs. Each device then runs its particles'
    program on its own, in parallel with the others, instead of one program whose every small
    kernel XLA:CPU splits over the cores (docs/performance.md, "Speed on a CPU")."""
    cores = physical_cores() if cores is None else int(cores)
    n = int(num_particles)
    units = n // 2 if n % 2 == 0 else n
    if n < 4 or cores < 2:
        return 1
    return max(d for d in range(1, min(cores, units) + 1) if units % d == 0)


def forced_host_devices() -> bool:
    """Whether ``XLA_FLAGS`` already sets the CPU's device count."""
    return "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")


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


class HostWatch:
    """Notices a lost process of a multi-process run, on a thread of its own.

    Every ``interval`` seconds each process bumps its counter in the key-value store of JAX's
    coordination service (``lopt/host_watch/beat/<process>``) and reads the others'. A process
    whose counter has not moved for ``timeout`` seconds, and that did not say it finished
    (:meth:`finished`), is lost; so is process 0 when the store, which runs there, does not
    answer. Then ``on_lost(processes, why)`` is called (from the thread): the command prints
    one line and exits, where the main thread may be blocked in a collective that never
    returns. :meth:`wait` lets the main thread, whose collective failed, wait for the verdict.
    """

    PREFIX = "lopt/host_watch"

    def __init__(self, timeout: float, on_lost: Callable[[list[int], str], None],
                 interval: float | None = None):
        from jax._src import distributed as jax_distributed  # the client initialize made

        self.client = jax_distributed.global_state.client
        if self.client is None:
            raise RuntimeError("HostWatch needs jax.distributed.initialize() first")
        self.timeout = float(timeout)
        self.interval = float(interval or max(0.5, self.timeout / 10))
        self.on_lost = on_lost
        self.me, self.count = jax.process_index(), jax.process_count()
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="lopt-host-watch", daemon=True)

    def start(self) -> HostWatch:
        self._thread.start()
        return self

    def finished(self) -> None:
        """This process ends normally: the others stop watching it; stop watching them."""
        self._stop.set()
        try:
            self.client.key_value_set(f"{self.PREFIX}/done/{self.me}", "1", allow_overwrite=True)
        except Exception:  # noqa: BLE001  (the service may be gone already)
            pass

    def wait(self, seconds: float | None = None) -> None:
        """Wait (by default ``timeout`` and two beats) for a lost process; when one is lost,
        wait for ``on_lost`` to end (the command's never does: it ends the process)."""
        if self._lost.wait(self.timeout + 2 * self.interval if seconds is None else seconds):
            self._thread.join()

    def _lose(self, processes: list[int], why: str) -> None:
        self._lost.set()
        self.on_lost(processes, why)

    def _entries(self, kind: str) -> list[tuple[int, str]]:
        """(process, value) of the keys ``PREFIX/kind/<process>``."""
        found = self.client.key_value_dir_get(f"{self.PREFIX}/{kind}/")
        return [(int(key.rsplit("/", 1)[1]), value) for key, value in found]

    def _watch(self) -> None:
        started = time.monotonic()
        seen: dict[int, tuple[str, float]] = {}  # process -> (its counter, when it last moved)
        while not self._stop.is_set():
            try:
                self.client.key_value_increment(f"{self.PREFIX}/beat/{self.me}", 1)
                beats = dict(self._entries("beat"))
                done = set(dict(self._entries("done")))
            except Exception as e:  # noqa: BLE001  (the coordination service is unreachable)
                if self._stop.is_set():
                    return
                why = " ".join(str(e).split())[:120]
                return self._lose([0], f"its coordination service does not answer: {why}")
            now = time.monotonic()
            for p, value in beats.items():
                if seen.get(p, (None,))[0] != value:
                    seen[p] = (value, now)
            lost = [p for p in range(self.count) if p != self.me and p not in done
                    and now - seen.get(p, (None, started))[1] > self.timeout]
            if lost:
                return self._lose(lost, f"no heartbeat for {self.timeout:.0f} s")
            self._stop.wait(self.interval)
