"""Import learned optimizers meta-trained with google/learned_optimization (``lopt-import``).

Its ``MLPLOpt`` (``learned_optimizers/mlp_lopt.py``) and ``AdafacMLPLOpt``
(``learned_optimizers/adafac_mlp_lopt.py``, the small_fc_lopt that PyLO and Celo build on) are
this project's ``mlp`` and ``adafac_mlp`` with a few constants and features set differently;
:func:`convert` maps their meta-params (haiku dicts) onto ours and sets those options (module
docstrings of ``lopt/mlp.py`` and ``lopt/adafac.py``), so the imported optimizer computes that
library's update. ``tests/lopt/test_import.py`` checks it against updates the peer computed.

:func:`read_params` reads the meta-params as that library writes them: a msgpack file of
``flax.serialization`` (its ``checkpoints.save_state``, which ``opt_from_checkpoint`` and its
published pretrained optimizers read, and the ``params_<step>`` files of ``outer_train`` with
flax's msgpack checkpoints), holding a ``ParameterCheckpoint`` (``params``, ``gen_id``,
``step``), a ``(params, gen_id, step)`` tuple or the bare params; or the orbax checkpoint
directory that ``flax.training.checkpoints`` writes with current flax. Every failure is one
:class:`ImportFailed` line naming the file and, where it is one, the leaf.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np

import lopt
from lopt import export as export_lib

__all__ = ["ARCHITECTURES", "ImportFailed", "convert", "import_file", "read_params"]

#: ``--arch`` names: learned_optimization's module for each and the architecture here.
ARCHITECTURES = {"mlp": ("mlp_lopt.MLPLOpt", "mlp"),
                 "adafac_mlp": ("adafac_mlp_lopt.AdafacMLPLOpt", "adafac_mlp")}
# MLPLOpt's fixed constants (mlp_lopt.py): its momentum decays and its normaliser's epsilon.
_MLP_DECAYS = (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)
_PEER_NORM_EPS = 1e-5
_TIMESCALES = (1, 3, 10, 30, 100, 300, 1000, 3000, 10_000, 30_000, 100_000)
#: AdafacMLPLOpt's constructor defaults that its meta-params do not record.
ADAFAC_DEFAULTS = {"momentum_decays": (0.9, 0.99, 0.999), "rms_decays": (0.999,),
                   "adafactor_decays": (0.9, 0.99, 0.999)}


class ImportFailed(ValueError):
    """The file is not learned_optimization meta-params of the requested architecture."""


def _unwrap(tree: Any) -> tuple[Any, dict]:
    """(meta-params, what the wrapper said) of a restored ParameterCheckpoint, a
    ``(params, gen_id, step)`` tuple or bare params."""
    if isinstance(tree, dict) and set(tree) == {"params", "gen_id", "step"}:
        return tree["params"], {"gen_id": str(tree["gen_id"]), "step": int(np.asarray(tree["step"]))}
    if isinstance(tree, dict) and set(tree) == {"0", "1", "2"} and isinstance(tree["0"], dict):
        return tree["0"], {"gen_id": str(tree["1"]), "step": int(np.asarray(tree["2"]))}
    return tree, {}


def read_params(path: str | os.PathLike) -> tuple[dict, dict]:
    """(meta-params as nested dicts of numpy arrays, {"gen_id", "step"} where the file has
    them) of a learned_optimization params file or orbax checkpoint directory."""
    path = os.fspath(path)
    if os.path.isdir(path):
        import orbax.checkpoint as ocp

        try:
            with warnings.catch_warnings():  # "sharding info not provided": we want host arrays
                warnings.simplefilter("ignore")
                tree = ocp.PyTreeCheckpointer().restore(os.path.abspath(path))
        except Exception as e:
            raise ImportFailed(f"{path}: not an orbax checkpoint orbax can restore "
                               f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    else:
        import flax.serialization

        with open(path, "rb") as f:
            data = f.read()
        try:
            tree = flax.serialization.msgpack_restore(data)
        except Exception as e:
            raise ImportFailed(f"{path}: not a flax msgpack file (learned_optimization's "
                               f"checkpoints.save_state) ({type(e).__name__})") from None
    params, info = _unwrap(tree)
    if not isinstance(params, dict):
        raise ImportFailed(f"{path}: holds a {type(params).__name__}, not a dict of meta-params")
    return _to_numpy(params), info


def _to_numpy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {str(k): _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree) if hasattr(tree, "shape") else tree


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        name = f"{prefix}/{k}" if prefix else k
        out.update(_flat(v, name) if isinstance(v, dict) else {name: v})
    return out


def _take(leaves: dict[str, Any], name: str, shape: tuple | None, where: str) -> np.ndarray:
    """Leaf ``name`` as float32, popped from ``leaves``; ``shape`` entries of None match any."""
    if name not in leaves:
        raise ImportFailed(f"{where}: missing leaf '{name}'")
    a = leaves.pop(name)
    if not (isinstance(a, np.ndarray) and a.dtype.kind == "f"):
        raise ImportFailed(f"{where}: leaf '{name}' is {type(a).__name__} "
                           f"{getattr(a, 'dtype', '')}, not a float array")
    if shape is not None and (a.ndim != len(shape) or any(
            s is not None and s != d for s, d in zip(shape, a.shape))):
        want = "[" + ", ".join("n" if s is None else str(s) for s in shape) + "]"
        raise ImportFailed(f"{where}: leaf '{name}' has shape {list(a.shape)}, expected {want}")
    return np.asarray(a, np.float32)


def _mlp_layers(leaves: dict, names: list[tuple[str, str]], fan_in: int, where: str) -> list:
    """The dense layers ``names`` ((weight, bias) leaf names), chained from ``fan_in`` inputs to
    2 outputs with equal hidden widths, as this project's ``[{"w", "b"}, ...]``."""
    layers = []
    for i, (wn, bn) in enumerate(names):
        last = i == len(names) - 1
        w = _take(leaves, wn, (fan_in, 2 if last else None), where)
        if not last and layers and w.shape[1] != layers[0]["w"].shape[1]:
            raise ImportFailed(f"{where}: leaf '{wn}' is {w.shape[1]} wide, the first hidden layer "
                               f"{layers[0]['w'].shape[1]}: hidden layers of unequal widths")
        layers.append({"w": w, "b": _take(leaves, bn, (w.shape[1],), where)})
        fan_in = w.shape[1]
    return layers


def _check_consumed(leaves: dict, where: str) -> None:
    if leaves:
        raise ImportFailed(f"{where}: cannot map leaf '{sorted(leaves)[0]}'"
                           + (f" (and {len(leaves) - 1} more)" if len(leaves) > 1 else ""))


def _convert_mlp(theta: dict, where: str, step_mult: float, exp_mult: float):
    leaves = _flat(theta)
    prefix = "mlp/~/linear_"
    n = sum(1 for k in leaves if k.startswith(prefix) and k.endswith("/w"))
    if n == 0:
        raise ImportFailed(f"{where}: no leaf '{prefix}0/w': not MLPLOpt meta-params "
                           f"(leaves {', '.join(sorted(leaves)[:4])})")
    num_features = 2 + len(_MLP_DECAYS) + len(_TIMESCALES)
    layers = _mlp_layers(leaves, [(f"{prefix}{i}/w", f"{prefix}{i}/b") for i in range(n)],
                         num_features, where)
    _check_consumed(leaves, where)
    learned_opt = lopt.get("mlp", hidden_size=layers[0]["w"].shape[1] if n > 1 else 32,
                           hidden_layers=n - 1, decays=_MLP_DECAYS, timescales=_TIMESCALES,
                           step_mult=step_mult, exp_mult=exp_mult, norm_eps=_PEER_NORM_EPS)
    return learned_opt, {"mlp": layers}


def adafac_feature_order(nm: int, nr: int, nf: int) -> np.ndarray:
    """Indices into AdafacMLPLOpt's first-layer rows in this project's feature order: it puts
    the factored-preconditioned momentum last of the 28, this project beside the preconditioned
    gradient (lopt/adafac.py's table); the time features follow in both."""
    sizes = [("g", 1), ("p", 1), ("m", nm), ("rms", nr), ("m_rms", nm * nr), ("rsqrt", nr),
             ("g_pre", nf), ("row", nf), ("col", nf), ("rrow", nf), ("rcol", nf), ("m_pre", nf)]
    start, blocks = 0, {}
    for name, size in sizes:
        blocks[name] = np.arange(start, start + size)
        start += size
    ours = ["g", "p", "m", "rms", "m_rms", "rsqrt", "g_pre", "m_pre", "row", "col", "rrow", "rcol"]
    return np.concatenate([blocks[k] for k in ours] + [start + np.arange(len(_TIMESCALES))])


def _convert_adafac(theta: dict, where: str, step_mult: float, exp_mult: float,
                    momentum_decays, rms_decays, adafactor_decays):
    leaves = _flat(theta)
    init = {"momentum": tuple(momentum_decays), "rms": tuple(rms_decays),
            "factored": tuple(adafactor_decays)}
    offsets = {}
    for key, leaf in (("momentum", "momentum_decays"), ("rms", "rms_decays"),
                      ("factored", "adafactor_decays")):
        offsets[key] = _take(leaves, leaf, (len(init[key]),), where)
    nm, nr, nf = (len(init[k]) for k in ("momentum", "rms", "factored"))
    if nr != 1 or nm != nf:
        raise ImportFailed(f"{where}: AdafacMLPLOpt with {nm} momentum, {nr} rms and {nf} "
                           "adafactor decays: only 1 rms decay and as many adafactor as momentum "
                           "decays map onto adafac_mlp")
    n = sum(1 for k in leaves if k.startswith("nn/~/w"))
    if n == 0:
        raise ImportFailed(f"{where}: no leaf 'nn/~/w0': not AdafacMLPLOpt meta-params "
                           "(or one built with concat_weights=False)")
    order = adafac_feature_order(nm, nr, nf)
    layers = _mlp_layers(leaves, [(f"nn/~/w{i}", f"nn/~/b{i}") for i in range(n)], len(order),
                         where)
    _check_consumed(leaves, where)
    layers[0]["w"] = np.ascontiguousarray(layers[0]["w"][order])
    learned_opt = lopt.get(
        "adafac_mlp", hidden_size=layers[0]["w"].shape[1] if n > 1 else 32, hidden_layers=n - 1,
        momentum_decays=init["momentum"], rms_decays=init["rms"], factored_decays=init["factored"],
        timescales=_TIMESCALES, step_mult=step_mult, exp_mult=exp_mult, learnable_decays=True,
        decay_param="log1m", norm_eps=_PEER_NORM_EPS, factored_order="size",
        preconditioner="learned_optimization", factored_grad_eps=1e-30)
    return learned_opt, {"mlp": layers, "decay_offsets": offsets}


def convert(arch: str, theta: dict, *, where: str = "meta-params", step_mult: float = 1e-3,
            exp_mult: float = 1e-3, **adafac_options) -> tuple[Any, dict]:
    """(learned optimizer, meta-params) here for learned_optimization meta-params ``theta``
    of ``arch`` (``"mlp"``: MLPLOpt; ``"adafac_mlp"``: AdafacMLPLOpt with
    ``concat_weights=True``, its default). ``step_mult`` and ``exp_mult`` are the peer's
    constructor options of those names; for ``adafac_mlp`` also ``momentum_decays``,
    ``rms_decays`` and ``adafactor_decays``, its initial decays (default
    :data:`ADAFAC_DEFAULTS`), which its meta-params offset."""
    if arch == "mlp":
        if adafac_options:
            raise ImportFailed(f"{where}: options {sorted(adafac_options)} are AdafacMLPLOpt's")
        return _convert_mlp(theta, where, step_mult, exp_mult)
    if arch == "adafac_mlp":
        unknown = set(adafac_options) - set(ADAFAC_DEFAULTS)
        if unknown:
            raise ImportFailed(f"{where}: unknown AdafacMLPLOpt options {sorted(unknown)}")
        return _convert_adafac(theta, where, step_mult, exp_mult,
                               **{**ADAFAC_DEFAULTS, **adafac_options})
    raise ImportFailed(f"unknown --arch {arch!r}: one of {', '.join(ARCHITECTURES)}")


def import_file(arch: str, params_path: str | os.PathLike, out: str | os.PathLike,
                **options) -> str:
    """Convert the learned_optimization meta-params in ``params_path`` (:func:`read_params`)
    and write them as an export to ``out`` (:func:`lopt.export.save`); returns ``out``."""
    params_path = os.fspath(params_path)
    theta, info = read_params(params_path)
    learned_opt, meta_params = convert(arch, theta, where=params_path, **options)
    metadata = {"imported_from": "learned_optimization",
                "peer_architecture": ARCHITECTURES[arch][0],
                "source": os.path.abspath(params_path),
                "peer_options": {k: list(v) if isinstance(v, tuple) else v
                                 for k, v in sorted(options.items())}, **info}
    return export_lib.save(out, learned_opt, meta_params, metadata=metadata)
