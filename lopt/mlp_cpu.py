"""The ``mlp`` learned optimizer's fused update on a CPU: a C++ XLA FFI kernel
(``lopt/kernels/mlp_update_cpu.cc``), used by ``lopt.get("mlp", fused=True)`` when JAX runs on
the CPU (on a GPU the same option runs the Pallas kernel of ``lopt/mlp_fused.py``).

What it computes is :meth:`lopt.mlp.MLPLOpt.leaf_updates` (Metz et al. 2019, App. D.1; see
``lopt/mlp.py``), all of it but the last elementwise step in one call for all leaves: a first
pass sums the squares behind the per-tensor second-moment scales (float32 partial sums of at
most 16 terms, added in double in a fixed order), a second does the per-coordinate rest
(momenta, features, every MLP layer) for 16 coordinates at a time with the hidden activations
in registers and L1, and XLA takes the step -o_1 exp(o_2 exp_mult) step_mult from the kernel's
two outputs. With many vmapped particles a task is one particle's two passes over every leaf,
so the thread pool is synchronised once per update. (The Pallas path computes the scales as XLA
reductions outside its kernel; in W1 those reductions and their glue were 8% of the fused
update's time.) Under XLA the hidden layers are written to memory and read back, [coordinates,
32] floats each; W1 (scripts/benchmark.py) spends about half its time there.

Building. The kernel is compiled on first use with the system C++ compiler (``$CXX``, else
``c++``) for this machine's CPU (``-march=native``) into ``$LOPT_CACHE_DIR`` (default
``~/.cache/lopt``), keyed by the source, the compiler command, jaxlib's version and the CPU's
feature flags, so a home directory shared by different machines keeps one build per kind of
machine. Where no compiler is found or the build fails, :func:`available` says why and
``fused=True`` computes the unfused update with a warning naming the reason.

bfloat16 middle layers (``MLPLOpt(bf16_hidden=True)``, off by default). Each middle layer
z_c = sum_i h_i W_ic (+ b_c, relu) takes bf16(h_i) bf16(W_ic) with both rounded to nearest
even (unit roundoff u = 2^-9) and the exact products summed in float32 (``vdpbf16ps``). So
|z_c - z_c(float32)| <= ((1 + u)^2 - 1 + H eps) sum_i |h_i W_ic|, about 2^-8 of the layer's
absolute terms, not of z_c itself (terms of opposite sign cancel in z_c, not in the bound); it
reaches the outputs through the next layers' absolute weights (relu is 1-Lipschitz).
tests/lopt/test_fused.py computes that bound per coordinate against a float64 reference and
checks the kernel inside it. (``vdpbf16ps`` also reads and writes float32 denormals, below
1.2e-38, as zero.) Needs AVX512-BF16 (``avx512_bf16`` in /proc/cpuinfo); without it the
float32 kernel runs, with a warning.

Supported: float32 leaves, ``hidden_layers >= 1`` with ``hidden_size`` a multiple of 16 (up to
256; the paper's and W1's 32), up to 62 momenta; other shapes fall back the same way.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from lopt import execution

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "mlp_update_cpu.cc")
#: The thread loop every CPU kernel includes (part of each build's key).
PARALLEL_FOR = os.path.join(os.path.dirname(SOURCE), "parallel_for.h")
TARGET = "lopt_mlp_update_cpu"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return os.uname().machine


def _compiler() -> str | None:
    """``$CXX`` where set (and nothing else), else the first of c++, g++, clang++ on the path."""
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"])
    return shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def build(sources: tuple[str, ...], name: str) -> tuple[str | None, str]:
    """Compile ``sources[0]`` (which includes the others; all of them are in the key) into
    ``$LOPT_CACHE_DIR/<name>-<key>.so``, or reuse it: (path of the library or None, why not).
    Shared by every CPU kernel of the package (``lopt/adafac_cpu.py`` too)."""
    cxx = _compiler()
    if cxx is None:
        return None, f"no C++ compiler ({'$CXX=' + os.environ['CXX'] + ' not found' if os.environ.get('CXX') else 'none of c++, g++, clang++ on the path'})"
    source = b""
    for file in sources:
        with open(file, "rb") as f:
            source += f.read()
    key = hashlib.sha256(
        b"\0".join([source, cxx.encode(), " ".join(FLAGS).encode(),
                    jaxlib.__version__.encode(), _cpu_flags().encode()])
    ).hexdigest()[:16]
    cache = os.environ.get("LOPT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lopt")
    path = os.path.join(cache, f"{name}-{key}.so")
    if os.path.exists(path):
        return path, ""
    os.makedirs(cache, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", sources[0], "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        os.unlink(tmp)
        return None, f"compiling {sources[0]} failed: {e}"
    if proc.returncode != 0:
        os.unlink(tmp)
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return None, f"compiling {sources[0]} failed: {last}"
    os.replace(tmp, path)  # atomic: concurrent processes each write their own temp file
    return path, ""


def register(built: tuple[str | None, str], symbol: str, target: str) -> tuple[bool, str]:
    """Load a :func:`build` result and register its FFI handler ``symbol`` with XLA as
    ``target`` on the CPU: (whether it is registered, why not)."""
    path, why = built
    if path is None:
        return False, why
    try:
        lib = ctypes.cdll.LoadLibrary(path)
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except Exception as e:  # a broken cache entry, an incompatible jaxlib
        return False, f"loading {path} failed: {e}"
    return True, ""


@functools.lru_cache(maxsize=None)
def _build() -> tuple[str | None, str]:
    """(path of the built library or None, why not)."""
    return build((SOURCE, PARALLEL_FOR), "mlp_update_cpu")


@functools.lru_cache(maxsize=None)
def available() -> tuple[bool, str]:
    """(whether the kernel is built and registered with XLA, why not)."""
    return register(_build(), "LoptMlpUpdate", TARGET)


def bf16_supported() -> bool:
    """Whether this CPU has the bfloat16 dot products ``bf16_hidden`` runs on."""
    return "avx512_bf16" in _cpu_flags().split()


def unsupported(learned_opt) -> str:
    """Why this architecture cannot use the kernel ('' when it can)."""
    if learned_opt.hidden_layers < 1:
        return "hidden_layers=0 (a linear model) is not in the kernel"
    if learned_opt.hidden_size % 16 or learned_opt.hidden_size > 256:
        return f"hidden_size={learned_opt.hidden_size} is not a multiple of 16 up to 256"
    if len(learned_opt.decays) > 62:
        return f"{len(learned_opt.decays)} momenta (the kernel takes up to 62)"
    if learned_opt.hidden_layers > 17:
        return f"hidden_layers={learned_opt.hidden_layers} (the kernel takes up to 17)"
    if getattr(learned_opt, "norm_eps", 1e-8) != 1e-8:
        return f"norm_eps={learned_opt.norm_eps:g} (the kernel normalises with 1e-8)"
    return ""


def usable(learned_opt) -> bool:
    """Whether ``fused`` runs this kernel here; a one-line notice, once per reason, when not."""
    reason = unsupported(learned_opt) or available()[1]
    if reason:
        execution.notice(f"mlp fused={learned_opt.fused!r}: the C++ CPU kernel is not used "
                         f"({reason}); computing the unfused update instead (same numbers, slower)")
    elif learned_opt.bf16_hidden and not bf16_supported():
        _warn_bf16_once("this CPU has no AVX512-BF16 (avx512_bf16 in /proc/cpuinfo)")
    return not reason


@functools.lru_cache(maxsize=None)
def _warn_bf16_once(reason: str) -> None:
    warnings.warn(f"mlp bf16_hidden=True: {reason}; computing the middle layers in float32",
                  stacklevel=5)


def pack_bf16_pairs(w: jax.Array) -> jax.Array:
    """A middle layer's [H, H] weights as the kernel's bf16 operand: [H / 2, H] uint32 words
    holding bf16(w[2q, c]) in the low and bf16(w[2q + 1, c]) in the high 16 bits (XLA's
    float32 -> bfloat16 conversion rounds to nearest even)."""
    h = w.shape[-2]
    w = jnp.asarray(w, jnp.float32)
    pairs = jnp.swapaxes(w.reshape(*w.shape[:-2], h // 2, 2, w.shape[-1]), -1, -2)
    return jax.lax.bitcast_convert_type(pairs.astype(jnp.bfloat16), jnp.uint32)


def _bf16_operands(learned_opt, layers) -> list:
    """The packed middle layers when ``bf16_hidden`` runs here, else none."""
    if not (learned_opt.bf16_hidden and bf16_supported()):
        return []
    return [pack_bf16_pairs(layer["w"]) for layer in layers[1:-1]]


def _leaves(learned_opt, layers, grads, params, momenta) -> tuple[list, list]:
    """Non-empty leaves: (updates, new momenta) as :meth:`MLPLOpt.leaf_updates` computes them,
    all from one kernel call."""
    num_dec, k = len(learned_opt.decays), len(grads)
    sizes = [int(np.size(g)) for g in grads]
    weights = [jnp.asarray(x, jnp.float32) for layer in layers for x in (layer["w"], layer["b"])]
    packed = _bf16_operands(learned_opt, layers)
    results = jax.ffi.ffi_call(
        TARGET,
        [jax.ShapeDtypeStruct((n, 2), jnp.float32) for n in sizes]
        + [jax.ShapeDtypeStruct(jnp.shape(g) + (num_dec,), jnp.float32) for g in grads],
        vmap_method="broadcast_all",
        # The new momenta overwrite the old in place (a block reads its own before writing them),
        # so the unroll's loop carry needs no copy of them.
        input_output_aliases={2 * k + i: k + i for i in range(k)},
    )(*[jnp.asarray(g, jnp.float32).reshape(n) for g, n in zip(grads, sizes)],
      *[jnp.asarray(p, jnp.float32).reshape(n) for p, n in zip(params, sizes)],
      *[jnp.asarray(m, jnp.float32) for m in momenta], *weights, *packed,
      decays=np.asarray(learned_opt.decays, np.float32), num_leaves=np.int32(k),
      bf16_hidden=np.int32(bool(packed)))
    steps = []
    for g, out in zip(grads, results[:k]):
        step = out[:, 0] * jnp.exp(out[:, 1] * learned_opt.exp_mult) * learned_opt.step_mult
        steps.append((-step).reshape(jnp.shape(g)).astype(jnp.result_type(g)))
    return steps, list(results[k:])


def _leaf(learned_opt, layers, g, p, m):
    """One leaf: (update, new momenta)."""
    steps, momenta = _leaves(learned_opt, layers, [g], [p], [m])
    return steps[0], momenta[0]


def forward(learned_opt, layers, grads, params, momenta) -> tuple[list, list]:
    """(updates, new momenta) per leaf: one kernel call for all non-empty leaves."""
    full = [i for i, g in enumerate(grads) if np.size(g) > 0]
    steps, new_momenta = list(grads), list(momenta)
    for i, g in enumerate(grads):
        if np.size(g) == 0:
            s, mn = learned_opt.leaf_updates(layers, [g], [params[i]], [momenta[i]])
            steps[i], new_momenta[i] = s[0], mn[0]
    if full:
        picked = ([x[i] for i in full] for x in (grads, params, momenta))
        s, mn = _leaves(learned_opt, layers, *picked)
        for i, si, mi in zip(full, s, mn):
            steps[i], new_momenta[i] = si, mi
    return steps, new_momenta
