"""Speed by default: ``fused="auto"`` (the default) runs the fused C++ kernel on a CPU wherever
it builds, never falling back silently; on a GPU, until a GPU run has checked the Pallas
kernel, it runs the unfused update and says so in one line (lopt/execution.py)."""

from __future__ import annotations

import importlib.util
import warnings

import jax
import jax.numpy as jnp
import pytest

import lopt
from lopt import execution, mlp_cpu
from tests import FAST_COMPILE


def _update_hlo(learned_opt) -> str:
    params = {"w": jnp.ones((40, 17)), "b": jnp.zeros((17,))}
    meta_params = learned_opt.init(jax.random.PRNGKey(0))

    def update(meta_params, params):
        opt = learned_opt.optimizer(meta_params)
        return opt.update(params, opt.init(params), params)

    return jax.jit(update).lower(meta_params, params).as_text()


def test_default_mlp_runs_the_cpu_kernel_or_says_why_not():
    """Where the kernel builds, the default optimizer's update is the kernel's custom call and
    nothing is said; where it does not, a one-line notice names the reason (never silent)."""
    execution.notice.cache_clear()
    built, why = mlp_cpu.available()
    if built:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            hlo = _update_hlo(lopt.get("mlp", hidden_layers=2))
        assert mlp_cpu.TARGET in hlo
    else:
        with pytest.warns(UserWarning, match="C\\+\\+ CPU kernel is not used"):
            hlo = _update_hlo(lopt.get("mlp", hidden_layers=2))
        assert mlp_cpu.TARGET not in hlo, why
    assert mlp_cpu.TARGET not in _update_hlo(lopt.get("mlp", fused=False))


def test_quickstart_trains_with_the_kernel():
    """The quickstart config, built as the train command builds it: its compiled outer step
    holds the kernel's custom call (lowered, not compiled)."""
    if not mlp_cpu.available()[0]:
        pytest.skip(f"the kernel does not build here: {mlp_cpu.available()[1]}")
    from lopt.experiments.inputs import config_path
    from lopt.training import config as config_lib
    from tasks.base import data_arrays

    spec = importlib.util.spec_from_file_location("qs", config_path("quickstart", "--config"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    trainer = config_lib.build(module.get_config())
    arrays = data_arrays(trainer.task_family)
    state = jax.eval_shape(trainer._init_fn, jax.random.PRNGKey(0), arrays)
    hlo = trainer._step_fn.lower(state, arrays).as_text()
    assert mlp_cpu.TARGET in hlo


def test_auto_on_a_gpu_is_the_unfused_update_with_a_notice(monkeypatch):
    """No GPU run has checked the Pallas kernel yet: "auto" on a GPU computes the unfused
    update and says so once; fused=True would run the kernel."""
    monkeypatch.setattr(execution, "backend", lambda: "gpu")
    execution.notice.cache_clear()
    auto = lopt.get("mlp")
    with pytest.warns(UserWarning, match="fused='auto': on gpu the unfused update runs"):
        assert execution.kernel_platform(auto) is None
    assert execution.kernel_platform(lopt.get("mlp", fused=True)) == "gpu"
    assert execution.kernel_platform(lopt.get("mlp", fused=False)) is None
    execution.notice.cache_clear()


def test_a_default_train_run_uses_the_cores_and_the_kernel(tmp_path):
    """``lopt-train`` with no speed flags: the CPU as one device per physical core as far as
    the pairs split (``--cpu_devices=auto``; 2 pairs here), the update in the C++ kernel with
    no notice of a fallback, and the run completes (the all-reduce wait of several CPU
    devices included)."""
    import os
    import subprocess
    import sys

    from lopt.training import distributed

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=root,
               XLA_FLAGS=FAST_COMPILE)  # no forced device count
    proc = subprocess.run(
        [sys.executable, os.path.join(root, "scripts", "meta_train.py"), "--config=quickstart",
         f"--workdir={tmp_path / 'run'}", "--noprogress", "--config.num_outer_steps=2",
         "--config.unroll.num_particles=4", "--config.unroll.trunc_length=4",
         "--config.unroll.horizon.length=8", "--config.lopt.hidden_size=16",
         "--config.log_every=1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    devices = distributed.auto_cpu_devices(4)
    assert f"on {devices} cpu device(s)" in proc.stdout, proc.stdout[-2000:]
    if mlp_cpu.available()[0]:
        assert "not used" not in proc.stderr and "unfused" not in proc.stderr, proc.stderr[-2000:]


def test_an_architecture_the_kernel_does_not_take_is_unfused_with_its_reason():
    """An imported learned_optimization MLPLOpt normalises with norm_eps=1e-5, not the
    kernels' 1e-8: "auto" computes its update unfused and says why; True refuses it."""
    execution.notice.cache_clear()
    with pytest.warns(UserWarning, match="norm_eps=1e-05"):
        hlo = _update_hlo(lopt.get("mlp", norm_eps=1e-5))
    assert mlp_cpu.TARGET not in hlo
    with pytest.raises(ValueError, match="norm_eps=1e-8"):
        lopt.get("mlp", norm_eps=1e-5, fused=True)
    execution.notice.cache_clear()
