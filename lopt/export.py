"""Save a trained learned optimizer to one file and load it back (DESIGN.md, "lopt/").

The file holds the architecture (registry name and config) and the meta-params, so
``load_optimizer(path)`` alone gives an optax transformation (``lopt.torch.load`` a torch one).
It is a plain safetensors file, readable without JAX or lopt, with a SHA-256 of its tensors;
loading fails with one-line typed errors. The format and the loading checks, in order, for a
reader in any language: docs/export-format.md."""

import datetime
import hashlib
import importlib.metadata
import json
import os
import tempfile
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import safetensors.numpy
from safetensors import SafetensorError, safe_open

import lopt
from lopt.base import LearnedOptimizer, MetaParams, build_optimizer, config_of

FORMAT_VERSION = 2
FORMAT_NAME = "lopt.export"
#: The ``__metadata__`` keys every export has (docs/export-format.md, section 3).
METADATA_KEYS = ("format", "format_version", "architecture", "config", "tensors_sha256",
                 "created", "lopt_version", "library_versions", "metadata")
# safetensors dtype codes as numpy names, for read_metadata (which reads no tensor data).
_NP_DTYPES = {"BOOL": "bool", "BF16": "bfloat16", "F16": "float16", "F32": "float32",
              "F64": "float64", "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64",
              "U8": "uint8", "U16": "uint16", "U32": "uint32", "U64": "uint64"}
__all__ = ["FORMAT_VERSION", "METADATA_KEYS", "ExportError", "CorruptExportError",
           "ArchitectureMismatchError", "UnsupportedFormatError", "save", "load",
           "load_optimizer", "read_metadata", "tensors_sha256"]


class ExportError(ValueError):
    """Base class of every error raised while saving or loading an export."""


class CorruptExportError(ExportError):
    """Not an export, truncated file, checksum mismatch or unparsable header."""


class ArchitectureMismatchError(ExportError):
    """The export's architecture or meta-param shapes differ from the architecture asked for."""


class UnsupportedFormatError(ExportError):
    """The export was written in a format version newer than this code reads."""


def _json_normalize(obj: Any, what: str) -> Any:
    """``obj`` as JSON reads it back; :class:`ExportError` if it is not JSON-able."""
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError) as e:
        raise ExportError(f"{what} must be JSON-serialisable (dicts with string keys, lists, "
                          f"str, int, float, bool, None): {e}") from None


def _leaves(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Leaves of ``tree``'s flax state dict (nested dicts; list items keyed "0", "1", ...)."""
    state = flax.serialization.to_state_dict(tree)
    if not isinstance(state, dict):
        return {prefix: state}
    return {p: v for k, sub in state.items() for p, v in _leaves(sub, (*prefix, str(k))).items()}


def _name(path: tuple[str, ...]) -> str:
    return "/".join(path) or "<root>"


def _describe(name: str, config: Any) -> str:
    return f"'{name}' {json.dumps(config, sort_keys=True)}"


def _arch_config(learned_opt: LearnedOptimizer, architecture_only: bool = False) -> dict[str, Any]:
    try:
        config = config_of(learned_opt, architecture_only=architecture_only)
    except TypeError:
        raise ExportError(f"cannot export {type(learned_opt).__name__}: a learned optimizer "
                          "must be a dataclass (lopt.base.config_of)") from None
    return _json_normalize(config, f"the config of learned optimizer '{learned_opt.name}'")


def _check_leaves(got: dict, want: dict, where: str, arch: str, path: str) -> None:
    """Raise :class:`ArchitectureMismatchError` unless the leaves ``got`` (path -> array) have
    the paths, shapes and dtypes of ``want``."""
    got, want = ({p: (tuple(map(int, np.shape(v))), np.dtype(v.dtype).name)
                  for p, v in leaves.items()} for leaves in (got, want))
    head = f"{where} of {path} do not match architecture {arch}: "
    missing, extra = [p for p in want if p not in got], [p for p in got if p not in want]
    if missing or extra:
        raise ArchitectureMismatchError(head + "; ".join(
            f"{what} " + ", ".join(map(_name, ps))
            for what, ps in (("missing", missing), ("unexpected", extra)) if ps))
    for p, (shape, dtype) in want.items():
        if got[p] != (shape, dtype):
            raise ArchitectureMismatchError(
                f"{head}leaf '{_name(p)}' is {got[p][1]}{list(got[p][0])} in the export but the "
                f"architecture has {dtype}{list(shape)}")


def tensors_sha256(tensors: dict[str, np.ndarray]) -> str:
    """Hex SHA-256 of the canonical bytes of named tensors (docs/export-format.md, section 4):
    per tensor in sorted name order, ``[name, dtype, shape]`` as compact JSON and a newline,
    then its raw little-endian C-order bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        h.update(json.dumps([name, a.dtype.name, list(a.shape)], separators=(",", ":")).encode())
        h.update(b"\n")
        h.update(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes(order="C"))
    return h.hexdigest()


def save(path: str | os.PathLike, learned_opt: LearnedOptimizer, meta_params: MetaParams,
         metadata: dict | None = None) -> str:
    """Write ``learned_opt`` and its ``meta_params`` to the safetensors file ``path`` and return
    ``path`` as a string. ``metadata`` is an optional JSON-able dict stored in the header (e.g.
    the outer step, the task family, the final meta-loss). Meta-params without the structure,
    shapes and dtypes of ``learned_opt.init(key)`` raise :class:`ArchitectureMismatchError`
    before any file is touched; the file is replaced atomically (a fsynced temporary file beside
    ``path``, then ``os.replace``)."""
    path = os.fspath(path)
    if not isinstance(metadata, dict | None):
        raise ExportError(f"metadata must be a dict, got {type(metadata).__name__}")
    metadata = _json_normalize(metadata or {}, "export metadata")
    config = _arch_config(learned_opt)
    leaves = _leaves(jax.tree.map(np.asarray, jax.device_get(meta_params)))
    for p, leaf in leaves.items():
        if not isinstance(leaf, np.ndarray):
            what = type(leaf).__name__
            raise ExportError(f"meta-param leaf '{_name(p)}' is a {what}, not an array")
    template = jax.eval_shape(learned_opt.init, jax.random.PRNGKey(0))  # shapes, dtypes
    _check_leaves(leaves, _leaves(template), "the meta-params",
                  _describe(learned_opt.name, config), f"the export to {path}")
    tensors = {"/".join(p): np.array(leaf, order="C") for p, leaf in leaves.items()}
    if len(tensors) != len(leaves) or "" in tensors:  # a root leaf, or keys that contain "/"
        raise ExportError("meta-params must be nested dicts/lists whose keys do not contain '/' "
                          f"(tensor names {sorted(map(_name, leaves))} are not unique)")
    lopt_version = next((d.version for d in importlib.metadata.distributions(name="lopt")), "")
    versions = {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
                "numpy": np.__version__, "safetensors": safetensors.__version__}
    header = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
              "architecture": learned_opt.name, "config": json.dumps(config),
              "tensors_sha256": tensors_sha256(tensors), "metadata": json.dumps(metadata),
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "lopt_version": lopt_version, "library_versions": json.dumps(versions)}
    try:
        data = safetensors.numpy.save(tensors, metadata=header)
    except Exception as e:  # e.g. a dtype safetensors cannot store
        raise ExportError(f"cannot write the meta-params as safetensors: {e}") from e
    os.makedirs(directory := os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)  # os.replace is the last step: tmp is still there
        raise
    return path


def _corrupt(path: str, why: str) -> CorruptExportError:
    return CorruptExportError(f"learned-optimizer export {path} is corrupted or truncated: {why}")


def _decode_metadata(meta: dict[str, str], path: str) -> dict:
    """The ``__metadata__`` checked and decoded as :func:`read_metadata` returns it."""
    if meta.get("format") != FORMAT_NAME:
        raise _corrupt(path, f"it is a safetensors file without lopt's metadata (format is "
                             f"{meta.get('format')!r}, not {FORMAT_NAME!r}); is it a lopt export?")
    version = meta.get("format_version", "")
    if version.isdecimal() and int(version) > FORMAT_VERSION:
        by = f" (written by lopt {meta['lopt_version']})" if meta.get("lopt_version") else ""
        raise UnsupportedFormatError(
            f"learned-optimizer export {path} has format_version {int(version)}{by}, but this "
            f"lopt reads versions up to {FORMAT_VERSION}; upgrade lopt to load it")
    if version != str(FORMAT_VERSION):
        raise _corrupt(path, f"format_version is {version!r}, not {str(FORMAT_VERSION)!r}")
    missing = [k for k in METADATA_KEYS if k not in meta]
    if missing:
        raise _corrupt(path, f"the metadata lacks {', '.join(missing)}")
    try:
        config, versions, user = map(json.loads, (meta["config"], meta["library_versions"],
                                                  meta["metadata"]))
    except ValueError as e:
        raise _corrupt(path, f"a JSON value of the metadata does not parse ({e})") from None
    if not isinstance(config, dict):
        raise _corrupt(path, "the metadata's config is not a JSON object")
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "metadata": user,
            "architecture": {"name": meta["architecture"], "config": config},
            "tensors_sha256": meta["tensors_sha256"], "created": meta["created"],
            "lopt_version": meta["lopt_version"] or None, "library_versions": versions}


def _read(path: str, arrays: bool) -> tuple[dict, dict[str, np.ndarray]]:
    """:func:`read_metadata` of ``path``, and with ``arrays`` its tensors by name. The
    ``safetensors`` library checks the framing (header length, UTF-8 JSON header, string
    metadata, dtype codes, offsets that fit the shapes and cover the data exactly, nothing
    after); its errors become a one-line :class:`CorruptExportError`."""
    try:
        with safe_open(path, "np") as f:
            header = _decode_metadata(f.metadata() or {}, path)
            slices = {k: f.get_slice(k) for k in sorted(f.keys())}
            header["meta_params"] = {"leaves": [
                {"path": k.split("/"), "shape": s.get_shape(),
                 "dtype": _NP_DTYPES.get(s.get_dtype(), s.get_dtype())} for k, s in slices.items()]}
            try:
                return header, {k: f.get_tensor(k) for k in slices if arrays}
            except (TypeError, AttributeError) as e:  # from numpy: a dtype it lacks (F8_E4M3, ...)
                raise _corrupt(path, f"a tensor's dtype has no numpy type ({e})") from None
    except SafetensorError as e:
        why = " ".join(str(e).split())  # one line
        raise _corrupt(path, f"safetensors cannot read it ({why})") from None


def read_metadata(path: str | os.PathLike) -> dict:
    """The export's header, decoded: ``format_version``, ``architecture`` (``{"name", "config"}``),
    ``meta_params`` (``{"leaves": [{"path", "shape", "dtype"}, ...]}``), ``created``,
    ``lopt_version``, ``library_versions``, ``metadata`` (the user's dict), and the checksum
    (``tensors_sha256``). Reads only the header, not the arrays; the checksum is not verified."""
    return _read(os.fspath(path), arrays=False)[0]


def _architecture(arch: dict, learned_opt: LearnedOptimizer | None, path: str,
                  modules: list | None = None) -> LearnedOptimizer:
    """The file's architecture ``{"name", "config"}`` rebuilt with ``lopt.get``; or
    ``learned_opt`` if it is the same one. Execution options (:data:`lopt.base.EXECUTION_OPTION`,
    e.g. mlp's ``fused``) are not compared: an export loads into either. Loading imports
    nothing: an architecture of the user's own is found once its module (``modules``, recorded
    by the run that wrote the export) is imported."""
    name, config = arch["name"], arch["config"]
    if learned_opt is None:
        try:
            return lopt.get(name, **config)
        except Exception as e:  # unknown name, unknown option, invalid value
            hint = (f" (the run that wrote it imported {', '.join(map(str, modules))}: import "
                    "them first)" if modules and name not in lopt.names() else "")
            raise ExportError(f"cannot rebuild the architecture {_describe(name, config)} of "
                              f"{path} with this lopt: {e}{hint}") from e
    req_name, req_config = learned_opt.name, _arch_config(learned_opt, architecture_only=True)
    mismatch = (f"export {path} holds {_describe(name, config)} but "
                f"{_describe(req_name, req_config)} was requested")
    if req_name != name:
        raise ArchitectureMismatchError(mismatch)
    try:  # the file's architecture as this code builds it: options added since do not count
        file_config = _arch_config(lopt.get(name, **config), architecture_only=True)
    except Exception:
        file_config = config
    if req_config != file_config:
        f, r = ({k: repr(c.get(k, "<unset>")) for k in set(file_config) | set(req_config)}
                for c in (file_config, req_config))
        raise ArchitectureMismatchError(mismatch + "; options differ: " + ", ".join(
            f"{k} ({f[k]} in the export, {r[k]} requested)" for k in sorted(f) if f[k] != r[k]))
    return learned_opt


def load(path: str | os.PathLike,
         learned_opt: LearnedOptimizer | None = None) -> tuple[LearnedOptimizer, MetaParams]:
    """Load ``(learned_opt, meta_params)`` from an export written by :func:`save`, bit-exact.
    With ``learned_opt=None`` the architecture is rebuilt from the file's name and config via
    ``lopt.get``. With ``learned_opt`` given, its name and config must equal the file's, else
    :class:`ArchitectureMismatchError`; the given object is returned. The checks, in order, and
    the errors they raise: docs/export-format.md, section 5."""
    path = os.fspath(path)
    header, tensors = _read(path, arrays=True)
    digest, recorded = tensors_sha256(tensors), header["tensors_sha256"]
    if digest != recorded:
        raise _corrupt(path, f"tensors sha256 {digest} differs from the metadata's {recorded}")
    modules = (header.get("metadata") or {}).get("modules")
    learned_opt = _architecture(header["architecture"], learned_opt, path, modules)
    template = jax.eval_shape(learned_opt.init, jax.random.PRNGKey(0))  # shapes, dtypes
    arrays = {tuple(name.split("/")): a for name, a in tensors.items()}
    _check_leaves(arrays, _leaves(template), "the export's meta-params",
                  _describe(learned_opt.name, _arch_config(learned_opt)), path)
    # The arrays in the template's state dict (nested dicts: every key path is of str keys).
    state = jax.tree_util.tree_map_with_path(lambda kp, _: arrays[tuple(k.key for k in kp)],
                                             flax.serialization.to_state_dict(template))
    meta_params = flax.serialization.from_state_dict(template, state)
    return learned_opt, jax.tree.map(jnp.asarray, meta_params)


def load_optimizer(path: str | os.PathLike, num_steps: int | None = None,
                   **options) -> optax.GradientTransformationExtraArgs:
    """The optax transformation of an export: ``update(grads, state, params, value=loss)``.
    ``num_steps``: the horizon, for those that read it (``velo``); ``options`` go to its
    ``optimizer`` (``velo``: ``weight_decay``, ``max_training_steps``)."""
    return build_optimizer(*load(path), num_steps, **options)
