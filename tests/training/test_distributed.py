"""``distributed.set_cpu_devices`` (the train command's ``--cpu_devices``): its checks, and its
one-line error once JAX has started (the test process has; the command-line path, before JAX
starts, is tests/test_config_errors.py::test_particles_split_into_whole_pairs_per_device);
``--cpu_devices=auto``'s device count (its run: tests/lopt/test_fast_default.py)."""

from __future__ import annotations

import os

import jax
import pytest

from lopt.training import distributed


@pytest.mark.parametrize("bad", [0, -2, 1.5, "4", True])
def test_cpu_devices_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="cpu_devices must be an integer >= 1"):
        distributed.set_cpu_devices(bad)


def test_cpu_devices_after_jax_started_is_a_one_line_error():
    jax.devices()  # the backend is up
    with pytest.raises(ValueError, match="already started its backends") as e:
        distributed.set_cpu_devices(jax.device_count() + 2)
    assert "\n" not in str(e.value)
    distributed.set_cpu_devices(1)  # JAX's default: nothing to change, no error
    assert jax.config.jax_num_cpu_devices in (-1, 1)


@pytest.mark.parametrize("particles,cores,expected", [
    (16, 2, 2),   # W1 on this kind of VM: 8 pairs, 2 cores
    (16, 16, 8),  # no more devices than pairs
    (12, 4, 3),   # 6 pairs do not split over 4 devices: 3
    (8, 3, 2),    # 4 pairs over 3 cores: 2
    (2, 8, 1),    # one pair: one device
    (16, 1, 1),   # one core
    (9, 4, 3),    # an odd count (no pairs) splits by particles
])
def test_auto_cpu_devices_splits_particles_into_whole_pairs(particles, cores, expected):
    n = distributed.auto_cpu_devices(particles, cores)
    assert n == expected and n <= cores
    assert (particles // 2 if particles % 2 == 0 else particles) % n == 0


CPUINFO = "".join(
    f"processor\t: {cpu}\nphysical id\t: {cpu // 4}\ncore id\t\t: {cpu % 4 // 2}\n\n"
    for cpu in range(8)  # 2 packages x 2 cores x 2 hyperthreads
)


def test_physical_cores_count_a_core_once_whatever_its_hyperthreads():
    assert distributed.cores_in_cpuinfo(CPUINFO) == 4
    assert distributed.cores_in_cpuinfo(CPUINFO, allowed={0, 1, 4}) == 2
    assert distributed.cores_in_cpuinfo("processor\t: 0\nmodel name\t: x\n") == 0
    n = distributed.physical_cores()
    assert 1 <= n <= len(os.sched_getaffinity(0))
