"""Export a trained learned optimizer to a single file, and load it back (DESIGN.md, "lopt/").

A researcher saves the architecture *and* the meta-params in one file; an end user turns that
file into an ordinary optax transformation with one call:

    lopt.export.save("out/mlp.lopt", learned_opt, meta_params, metadata={"outer_step": 5000})
    opt = lopt.export.load_optimizer("out/mlp.lopt")   # optax.GradientTransformationExtraArgs

File format (version 1; this layout is the versioned public format)
--------------------------------------------------------------------
All integers are little-endian. The file is, in order:

1. **Magic**: the 12 bytes ``b"LOPT-EXPORT\\n"``.
2. **Header length**: an unsigned 64-bit integer ``n`` (8 bytes, ``struct`` format ``"<Q"``).
3. **Header**: ``n`` bytes of UTF-8 JSON, an object with the keys

   ``format_version``  int, ``1`` for this layout. Readers refuse versions newer than theirs.
   ``architecture``    ``{"name": <registry name>, "config": <constructor options>}``; the
                       config is :func:`lopt.base.config_of` (tuples written as lists), so
                       ``lopt.get(name, **config)`` rebuilds the architecture.
   ``meta_params``     ``{"encoding": "flax-msgpack-state-dict", "leaves": [...]}`` with one
                       ``{"path": [key, ...], "shape": [int, ...], "dtype": "float32"}`` per
                       array, in the order of the flattened state dict. ``path`` are the string
                       keys of ``flax.serialization.to_state_dict(meta_params)`` (list indices
                       appear as ``"0"``, ``"1"``, ...).
   ``payload_bytes``   int, the payload's length.
   ``payload_sha256``  hex SHA-256 digest of the payload.
   ``created``         UTC time of the export, ISO 8601 (``2024-05-01T12:00:00+00:00``).
   ``lopt_version``    version of the installed ``lopt`` distribution, or ``null``.
   ``library_versions`` ``{"jax": ..., "flax": ..., "optax": ...}`` (informational).
   ``metadata``        the user's dict (JSON; keys become strings, tuples become lists;
                       NaN/Infinity are written the way Python's ``json`` writes them).

4. **Payload**: exactly ``payload_bytes`` bytes,
   ``flax.serialization.msgpack_serialize(flax.serialization.to_state_dict(meta_params))``.
   Nothing follows the payload.

Loading checks, in order: the magic, the header length and JSON (a failure is a
:class:`CorruptExportError`), ``format_version`` (:class:`UnsupportedFormatError` when newer),
the payload length and SHA-256 (:class:`CorruptExportError`, "corrupted or truncated"), the
architecture (rebuilt from the registry, or compared with the one the caller passes:
:class:`ArchitectureMismatchError`), then every meta-param leaf: the header's leaves and the
payload's arrays must both match, path for path, the shapes and dtypes of the architecture's own
``init`` (:class:`ArchitectureMismatchError`). Only the payload is checksummed, so a header whose
shapes were edited by hand passes the checksum and is reported as an
:class:`ArchitectureMismatchError` naming the leaf, its shape in the export and its shape in the
architecture. Arrays are restored into the architecture's template with
``flax.serialization.from_state_dict``, so the round trip is bit-exact.

Files are written atomically: to a temporary file in the target's directory, then
``os.replace``; parent directories are created.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import struct
import tempfile
from typing import Any

import flax
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lopt
from lopt.base import LearnedOptimizer, MetaParams, config_of

FORMAT_VERSION = 1
MAGIC = b"LOPT-EXPORT\n"
PAYLOAD_ENCODING = "flax-msgpack-state-dict"
_LEN = struct.Struct("<Q")
_REQUIRED_KEYS = (
    "format_version", "architecture", "meta_params", "payload_bytes", "payload_sha256"
)

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "ExportError",
    "CorruptExportError",
    "ArchitectureMismatchError",
    "UnsupportedFormatError",
    "save",
    "load",
    "load_optimizer",
    "read_metadata",
]


class ExportError(ValueError):
    """Base class of every error raised while saving or loading an export."""


class CorruptExportError(ExportError):
    """Bad magic, truncated file, checksum mismatch or unparsable header."""


class ArchitectureMismatchError(ExportError):
    """The export's architecture or meta-param shapes differ from the architecture asked for."""


class UnsupportedFormatError(ExportError):
    """The export was written in a format version newer than this code reads."""


# --- helpers -----------------------------------------------------------------------------------


def _json_normalize(obj: Any, what: str) -> Any:
    """``obj`` as JSON reads it back; :class:`ExportError` if it is not JSON-able."""
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError) as e:
        raise ExportError(
            f"{what} must be JSON-serialisable (dicts with string keys, lists, str, int, float, "
            f"bool, None): {e}"
        ) from None


def _flatten(state: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Leaves of a (nested-dict) state dict keyed by their path of string keys."""
    if isinstance(state, dict):
        out: dict[tuple[str, ...], Any] = {}
        for k, v in state.items():
            out.update(_flatten(v, prefix + (str(k),)))
        return out
    return {prefix: state}


def _fmt_path(path: tuple[str, ...] | list[str]) -> str:
    return "/".join(path) if path else "<root>"


def _spec(x: Any) -> tuple[tuple[int, ...], str]:
    return tuple(int(d) for d in np.shape(x)), np.dtype(x.dtype).name


def _describe(name: str, config: Any) -> str:
    return f"'{name}' {json.dumps(config, sort_keys=True)}"


def _arch_config(learned_opt: LearnedOptimizer) -> dict[str, Any]:
    try:
        config = config_of(learned_opt)
    except TypeError:
        raise ExportError(
            f"cannot export {type(learned_opt).__name__}: a learned optimizer must be a "
            "dataclass whose constructor options describe it (see lopt.base.config_of)"
        ) from None
    return _json_normalize(config, f"the config of learned optimizer '{learned_opt.name}'")


def _template(learned_opt: LearnedOptimizer) -> Any:
    """Shapes and dtypes of ``learned_opt.init(PRNGKey(0))``, without running it."""
    return jax.eval_shape(learned_opt.init, jax.random.PRNGKey(0))


def _specs(tree: Any) -> dict[tuple[str, ...], tuple[tuple[int, ...], str]]:
    """Path -> (shape, dtype) of every leaf of ``tree``'s flax state dict."""
    return {p: _spec(v) for p, v in _flatten(flax.serialization.to_state_dict(tree)).items()}


def _check_leaves(
    got: dict[tuple[str, ...], tuple[tuple[int, ...], str]],
    want: dict[tuple[str, ...], tuple[tuple[int, ...], str]],
    where: str,
    arch: str,
    path: str,
) -> None:
    """Raise :class:`ArchitectureMismatchError` unless ``got`` matches ``want`` leaf for leaf."""
    missing = [p for p in want if p not in got]
    extra = [p for p in got if p not in want]
    if missing or extra:
        parts = []
        if missing:
            parts.append("missing " + ", ".join(_fmt_path(p) for p in missing))
        if extra:
            parts.append("unexpected " + ", ".join(_fmt_path(p) for p in extra))
        raise ArchitectureMismatchError(
            f"{where} of {path} do not match architecture {arch}: {'; '.join(parts)}"
        )
    for p, (shape, dtype) in want.items():
        g_shape, g_dtype = got[p]
        if (g_shape, g_dtype) != (shape, dtype):
            raise ArchitectureMismatchError(
                f"{where} of {path} do not match architecture {arch}: leaf '{_fmt_path(p)}' is "
                f"{g_dtype}{list(g_shape)} in the export but the architecture has "
                f"{dtype}{list(shape)}"
            )


def _library_versions() -> dict[str, str]:
    return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__}


def _lopt_version() -> str | None:
    try:
        return importlib.metadata.version("lopt")
    except importlib.metadata.PackageNotFoundError:
        return None


# --- writing -----------------------------------------------------------------------------------


def save(
    path: str | os.PathLike,
    learned_opt: LearnedOptimizer,
    meta_params: MetaParams,
    metadata: dict | None = None,
) -> str:
    """Write ``learned_opt`` and its ``meta_params`` to the single file ``path`` (atomically).

    ``metadata`` is an optional JSON-able dict stored in the header (e.g. the outer step, the
    task family, the final meta-loss). The meta-params must have the structure, shapes and dtypes
    of ``learned_opt.init(key)``, else :class:`ArchitectureMismatchError` is raised before any
    file is touched. Returns the path written, as a string.
    """
    path = os.fspath(path)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise ExportError(f"metadata must be a dict, got {type(metadata).__name__}")
    metadata = _json_normalize(metadata, "export metadata")
    name = learned_opt.name
    config = _arch_config(learned_opt)
    arch = _describe(name, config)

    host = jax.device_get(meta_params)
    host = jax.tree.map(np.asarray, host)
    state = flax.serialization.to_state_dict(host)
    leaves = _flatten(state)
    for p, leaf in leaves.items():
        if not isinstance(leaf, np.ndarray):
            raise ExportError(
                f"meta-param leaf '{_fmt_path(p)}' is a {type(leaf).__name__}, not an array"
            )
    got = {p: _spec(v) for p, v in leaves.items()}
    want = _specs(_template(learned_opt))
    _check_leaves(got, want, "the meta-params", arch, f"the export to {path}")

    payload = flax.serialization.msgpack_serialize(state)
    header = {
        "format_version": FORMAT_VERSION,
        "architecture": {"name": name, "config": config},
        "meta_params": {
            "encoding": PAYLOAD_ENCODING,
            "leaves": [
                {"path": list(p), "shape": list(shape), "dtype": dtype}
                for p, (shape, dtype) in got.items()
            ],
        },
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "lopt_version": _lopt_version(),
        "library_versions": _library_versions(),
        "metadata": metadata,
    }
    header_bytes = json.dumps(header, indent=1).encode("utf-8")

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    prefix = "." + os.path.basename(path) + "."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC)
            f.write(_LEN.pack(len(header_bytes)))
            f.write(header_bytes)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


# --- reading -----------------------------------------------------------------------------------


def _corrupt(path: str, why: str) -> CorruptExportError:
    return CorruptExportError(f"learned-optimizer export {path} is corrupted or truncated: {why}")


def _read_header(f, path: str) -> tuple[dict, int]:
    """Parse magic, header length and header; return (header, payload offset)."""
    magic = f.read(len(MAGIC))
    if magic != MAGIC:
        raise _corrupt(
            path,
            f"it does not start with the magic bytes {MAGIC!r} (found {magic!r}); "
            "is it a lopt export?",
        )
    raw_len = f.read(_LEN.size)
    if len(raw_len) != _LEN.size:
        raise _corrupt(path, "the file ends inside the header length")
    (n,) = _LEN.unpack(raw_len)
    size = os.fstat(f.fileno()).st_size
    offset = len(MAGIC) + _LEN.size
    if n > size - offset:
        raise _corrupt(path, f"the header claims {n} bytes but only {size - offset} follow")
    raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _corrupt(path, f"the header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "the header is not a JSON object")
    version = header.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise _corrupt(path, f"the header has no integer format_version (got {version!r})")
    if version > FORMAT_VERSION:
        made_by = header.get("lopt_version")
        by = f" (written by lopt {made_by})" if made_by else ""
        raise UnsupportedFormatError(
            f"learned-optimizer export {path} has format_version {version}{by}, but this lopt "
            f"reads versions up to {FORMAT_VERSION}; upgrade lopt to load it"
        )
    if version < 1:
        raise _corrupt(path, f"invalid format_version {version}")
    missing = [k for k in _REQUIRED_KEYS if k not in header]
    if missing:
        raise _corrupt(path, f"the header lacks {', '.join(missing)}")
    arch = header["architecture"]
    if not (
        isinstance(arch, dict)
        and isinstance(arch.get("name"), str)
        and isinstance(arch.get("config"), dict)
    ):
        raise _corrupt(path, "the header's architecture is not {name: str, config: dict}")
    return header, offset + n


def read_metadata(path: str | os.PathLike) -> dict:
    """The export's JSON header (architecture, leaf shapes, versions, ``metadata``, ...).

    Reads only the header, not the arrays; the payload checksum is not verified.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        header, _ = _read_header(f, path)
    return header


def _header_leaves(header: dict, path: str) -> dict[tuple[str, ...], tuple[tuple[int, ...], str]]:
    mp = header["meta_params"]
    try:
        if mp.get("encoding", PAYLOAD_ENCODING) != PAYLOAD_ENCODING:
            raise _corrupt(path, f"unknown meta-param encoding {mp['encoding']!r}")
        out = {}
        for leaf in mp["leaves"]:
            out[tuple(str(k) for k in leaf["path"])] = (
                tuple(int(d) for d in leaf["shape"]),
                np.dtype(leaf["dtype"]).name,
            )
        return out
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        if isinstance(e, CorruptExportError):
            raise
        raise _corrupt(path, f"the header's meta_params table is malformed ({e!r})") from None


def _rebuild(name: str, config: dict, path: str) -> LearnedOptimizer:
    try:
        return lopt.get(name, **config)
    except Exception as e:  # unknown name, unknown option, invalid value
        raise ExportError(
            f"cannot rebuild the architecture {_describe(name, config)} of {path} with this "
            f"lopt: {e}"
        ) from e


def load(
    path: str | os.PathLike, learned_opt: LearnedOptimizer | None = None
) -> tuple[LearnedOptimizer, MetaParams]:
    """Load ``(learned_opt, meta_params)`` from an export written by :func:`save`.

    With ``learned_opt=None`` the architecture is rebuilt from the file's name and config via
    ``lopt.get``. With ``learned_opt`` given, its name and config must equal the file's, else
    :class:`ArchitectureMismatchError`; the given object is returned. See the module docstring
    for the checks and the errors they raise.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        header, offset = _read_header(f, path)
        payload = f.read()
    expected = header["payload_bytes"]
    if len(payload) < expected:
        raise _corrupt(path, f"the payload has {len(payload)} of its {expected} bytes")
    if len(payload) > expected:
        raise _corrupt(path, f"{len(payload) - expected} unexpected bytes follow the payload")
    digest = hashlib.sha256(payload).hexdigest()
    if digest != header["payload_sha256"]:
        raise _corrupt(
            path, f"payload sha256 {digest} differs from the header's {header['payload_sha256']}"
        )

    name = header["architecture"]["name"]
    config = header["architecture"]["config"]
    file_arch = _describe(name, config)
    if learned_opt is None:
        learned_opt = _rebuild(name, config, path)
    else:
        req_name, req_config = learned_opt.name, _arch_config(learned_opt)
        file_config = config
        if req_name == name:
            # Compare with the file's architecture as this code builds it, so options added
            # (with defaults) since the export was written do not count as a difference.
            try:
                file_config = _arch_config(lopt.get(name, **config))
            except Exception:
                file_config = config
        if req_name != name or req_config != file_config:
            diff = ""
            if req_name == name:
                keys = sorted(set(file_config) | set(req_config))
                diff = "; options differ: " + ", ".join(
                    f"{k} ({file_config.get(k, '<unset>')!r} in the export, "
                    f"{req_config.get(k, '<unset>')!r} requested)"
                    for k in keys
                    if file_config.get(k, "<unset>") != req_config.get(k, "<unset>")
                )
            raise ArchitectureMismatchError(
                f"export {path} holds {file_arch} but {_describe(req_name, req_config)} was "
                f"requested{diff}"
            )

    arch = _describe(learned_opt.name, _arch_config(learned_opt))
    template = _template(learned_opt)
    want = _specs(template)
    _check_leaves(_header_leaves(header, path), want, "the header's meta-params", arch, path)

    try:
        state = flax.serialization.msgpack_restore(payload)
    except Exception as e:
        raise _corrupt(path, f"the payload does not decode ({e!r})") from None
    arrays = _flatten(state)
    for p, leaf in arrays.items():
        if not isinstance(leaf, np.ndarray):
            raise _corrupt(path, f"payload leaf '{_fmt_path(p)}' is not an array")
    _check_leaves(
        {p: _spec(v) for p, v in arrays.items()}, want, "the payload's meta-params", arch, path
    )
    restored = flax.serialization.from_state_dict(template, state)
    meta_params = jax.tree.map(jnp.asarray, restored)
    return learned_opt, meta_params


def load_optimizer(path: str | os.PathLike) -> optax.GradientTransformationExtraArgs:
    """The optax transformation an export defines, ready for an ordinary training loop:

        opt = lopt.export.load_optimizer(path)
        state = opt.init(params)
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    """
    learned_opt, meta_params = load(path)
    return learned_opt.optimizer(meta_params)
