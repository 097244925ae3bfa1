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
                 "adafac_mlp": ("adafac_mlp_lopt.AdafacMLPLOpt", "adafac_mlp"),
                 "velo": ("research.general_lopt.hyper_v2.HyperV2", "velo")}
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
    if arch == "velo":
        return _convert_velo(theta, where, adafac_options.pop("gin", None) or {},
                             step_mult=step_mult, exp_mult=exp_mult, **adafac_options)
    raise ImportFailed(f"unknown --arch {arch!r}: one of {', '.join(ARCHITECTURES)}")


def import_file(arch: str, params_path: str | os.PathLike, out: str | os.PathLike,
                **options) -> str:
    """Convert the learned_optimization meta-params in ``params_path`` (:func:`read_params`)
    and write them as an export to ``out`` (:func:`lopt.export.save`); returns ``out``. For
    ``velo`` the ``config.gin`` beside ``params_path``, when present, gives the configuration
    (:func:`read_gin`)."""
    params_path = os.fspath(params_path)
    theta, info = read_params(params_path)
    if arch == "velo":
        gin_path = os.path.join(os.path.dirname(os.path.abspath(params_path)), "config.gin")
        if os.path.exists(gin_path):
            options["gin"] = read_gin(gin_path)
            info["config_gin"] = gin_path
    learned_opt, meta_params = convert(arch, theta, where=params_path, **options)
    metadata = {"imported_from": "learned_optimization",
                "peer_architecture": ARCHITECTURES[arch][0],
                "source": os.path.abspath(params_path),
                "peer_options": {k: list(v) if isinstance(v, tuple) else v
                                 for k, v in sorted(options.items()) if k != "gin"},
                **({"peer_config": {k: list(v) if isinstance(v, tuple) else v
                                    for k, v in sorted(options["gin"].items())}}
                   if "gin" in options else {}), **info}
    return export_lib.save(out, learned_opt, meta_params, metadata=metadata)


# --- VeLO: learned_optimization's HyperV2 ------------------------------------------------------

#: HyperV2 arguments that lopt's ``velo`` implements only at these values (its defaults, and
#: ``use_bugged_loss_features=False`` as in the published checkpoint).
_VELO_FIXED = {
    "initial_momentum_decays": (0.9, 0.99, 0.999), "initial_rms_decays": (0.999,),
    "initial_adafactor_decays": (0.9, 0.99, 0.999), "mix_layers": True,
    "with_validation_feature_dim": False, "use_bugged_next_lstm_state": False,
    "use_bugged_loss_features": False, "precondition_output": False, "rnn_state_decay": 0.0,
    "adafactor_accumulator": True, "param_scale_mult": True, "constant_loss": False,
    "clip_param_scale_amount": None,
    **{f"with_{k}": True for k in ("g", "m", "m_feat", "rms", "rms_feat", "rms_norm_g",
                                    "rsqrt_rms", "p", "fac_norm_g", "fac_rms", "fac_rsqrt",
                                    "grad_clip_feat", "fac_mom_mult", "rms_only_norm_g")},
}
#: HyperV2 arguments that map onto velo's options, and ones that change no update.
_VELO_OPTIONS = ("lstm_hidden_size", "param_inits", "ff_hidden_size", "ff_hidden_layers",
                 "step_mult", "exp_mult")
_VELO_INERT = ("validation_mode", "reparam_decay", "summarize_each_layer", "summarize_all_control")


def read_gin(path: str) -> dict[str, Any]:
    """The ``HyperV2.<arg> = <value>`` bindings of a learned_optimization ``config.gin`` (any
    scope prefix), values as Python literals; ``ImportFailed`` when its ``run_train.lopt`` is
    another learned optimizer."""
    import ast

    with open(path) as f:
        text = f.read().replace("\\\n", "")
    out: dict[str, Any] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if "=" not in line:
            continue
        key, value = (x.strip() for x in line.split("=", 1))
        if key.split("/")[-1] == "run_train.lopt" and "HyperV2" not in value:
            raise ImportFailed(f"{path}: run_train.lopt = {value}, not HyperV2 (VeLO)")
        name = key.split("/")[-1]
        if name.startswith("HyperV2."):
            try:
                out[name[len("HyperV2."):]] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise ImportFailed(f"{path}: cannot read {key} = {value}") from None
    return out


def _convert_velo(theta: dict, where: str, gin: dict, step_mult: float = 1e-3,
                  exp_mult: float = 1e-3):
    from lopt import velo

    for k, v in gin.items():
        if k in _VELO_FIXED and (tuple(v) if isinstance(v, list) else v) != _VELO_FIXED[k]:
            raise ImportFailed(f"{where}: config.gin sets HyperV2.{k} = {v!r}, which lopt's velo "
                               f"does not implement (it implements {_VELO_FIXED[k]!r})")
        if k not in _VELO_FIXED and k not in _VELO_OPTIONS and k not in _VELO_INERT:
            raise ImportFailed(f"{where}: config.gin sets HyperV2.{k}, an argument lopt's velo "
                               "does not know")
    leaves = _flat(theta)
    try:  # the sizes: config.gin's, else the arrays'
        sizes = {"lstm_hidden_size": int(leaves["lstm_init_state/hidden"].shape[-1]),
                 "param_inits": int(leaves["ff_mod_stack/~/b0"].shape[0]),
                 "ff_hidden_size": int(leaves["ff_mod_stack/~/b0"].shape[1]),
                 "ff_hidden_layers": sum(1 for k in leaves if k.startswith("ff_mod_stack/~/b")) - 1}
    except KeyError as e:
        raise ImportFailed(f"{where}: no leaf {e.args[0]!r}: not HyperV2 meta-params "
                           f"(leaves {', '.join(sorted(leaves)[:4])})") from None
    options = {**sizes, "step_mult": step_mult, "exp_mult": exp_mult,
               **{k: gin[k] for k in _VELO_OPTIONS if k in gin}}
    try:
        learned_opt = lopt.get("velo", **options)
        return learned_opt, velo.from_google(learned_opt, theta)
    except ValueError as e:
        raise ImportFailed(f"{where}: {' '.join(str(e).split())}") from None
