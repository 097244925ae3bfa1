"""``distributed.set_cpu_devices`` (the train command's ``--cpu_devices``): its checks, and its
one-line error once JAX has started (the test process has; the command-line path, before JAX
starts, is tests/test_config_errors.py::test_particles_split_into_whole_pairs_per_device)."""

from __future__ import annotations

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
