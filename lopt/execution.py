"""The ``fused`` execution option of ``mlp``: which kernel computes its update.

``fused="auto"`` (the default) runs the fused kernel wherever one is known to be right: on a
CPU the C++ XLA FFI kernel, built on first use (``lopt/mlp_cpu.py``); on a GPU not yet (the
Pallas kernel of ``lopt/mlp_fused.py`` has never run on one; ``scripts/gpu_check.sh`` is the
check that would turn it on), so there the unfused update runs and a one-line notice says so.
``fused=True`` asks for the kernel everywhere (the Pallas one on a GPU); ``fused=False`` never
uses it. Where a kernel cannot run (no C++ compiler, an architecture it does not take) the
unfused update runs, with a one-line notice naming the reason, once per reason: a default run
never falls back silently (tests/lopt/test_fast_default.py). Every path computes the same
numbers up to float32 rounding, so the option is not part of the architecture and exports
leave it out (``lopt.base.EXECUTION_OPTION``).
"""

from __future__ import annotations

import functools
import warnings

import jax
import numpy as np

AUTO = "auto"
_WORDS = {"auto": AUTO, "true": True, "1": True, "false": False, "0": False}


def fused_option(owner: str, value) -> bool | str:
    """``value`` as True, False or ``"auto"``; the strings ``"true"``, ``"false"``, ``"auto"``
    (any case) are accepted too, as a command-line override of a config's ``"auto"`` gives."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _WORDS:
        return _WORDS[value.strip().lower()]
    raise ValueError(f"{owner}: fused must be True, False or 'auto', got {value!r}")


@functools.lru_cache(maxsize=None)
def notice(message: str) -> None:
    """One line, once per message in a process (commands print warnings as one line)."""
    warnings.warn(message, stacklevel=4)


def backend() -> str:
    """JAX's default backend ("cpu", "gpu", "tpu"): where an update traced now will run."""
    return jax.default_backend()


def kernel_platform(learned_opt) -> str | None:
    """Where ``learned_opt``'s ``fused`` option sends its update here: ``"cpu"`` (the C++
    kernel, if it is usable: the caller checks), ``"gpu"`` (the Pallas kernel), or None (the
    unfused update; a notice says why when the option asked for a kernel)."""
    if learned_opt.fused is False:
        return None
    where = backend()
    if where == "cpu":
        return "cpu"
    if learned_opt.fused is True and where == "gpu" and learned_opt.name == "mlp":
        return "gpu"
    if learned_opt.fused is True:
        notice(f"{learned_opt.name} fused=True: no fused kernel for the {where} backend; "
               "computing the unfused update (same numbers)")
    elif learned_opt.name != "mlp":  # adafac_mlp: a CPU kernel only (lopt/adafac_cpu.py)
        notice(f"{learned_opt.name} fused='auto': on {where} the unfused update runs (its fused "
               "kernel is a CPU one)")
    else:
        notice(f"{learned_opt.name} fused='auto': on {where} the unfused update runs (the "
               "fused kernel is on by default only where a run has checked it: the C++ one on "
               "CPUs; scripts/gpu_check.sh checks the Pallas one; fused=True runs it)")
    return None
