"""Save a trained learned optimizer to one file and load it back (DESIGN.md, "lopt/").

The file holds the architecture (registry name and config) and the meta-params, so
``load_optimizer(path)`` alone gives an optax transformation (``lopt.torch.load`` a torch one).
It is a plain safetensors file, readable without JAX or lopt, with a SHA-256 of its tensors;
loading fails with one-line typed errors. The format and the loading checks, in order, for a
reader in any language: docs/export-format.md."""

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
import safetensors
import safetensors.numpy

import lopt
from lopt.base import LearnedOptimizer, MetaParams, config_of

FORMAT_VERSION = 2
FORMAT_NAME = "lopt.export"
#: The ``__metadata__`` keys every format-2 export has.
METADATA_KEYS = (
    "format",
    "format_version",
    "architecture",
    "config",
    "tensors_sha256",
    "created",
    "lopt_version",
    "library_versions",
    "metadata",
)
_LEN = struct.Struct("<Q")
# safetensors dtype codes -> (numpy name, bytes per element).
_ST_DTYPES = {
    "BOOL": ("bool", 1), "U8": ("uint8", 1), "I8": ("int8", 1), "U16": ("uint16", 2),
    "I16": ("int16", 2), "F16": ("float16", 2), "BF16": ("bfloat16", 2), "U32": ("uint32", 4),
    "I32": ("int32", 4), "F32": ("float32", 4), "U64": ("uint64", 8), "I64": ("int64", 8),
    "F64": ("float64", 8),
}

__all__ = [
    "FORMAT_VERSION",
    "METADATA_KEYS",
    "ExportError",
    "CorruptExportError",
    "ArchitectureMismatchError",
    "UnsupportedFormatError",
    "save",
    "load",
    "load_optimizer",
    "read_metadata",
    "tensors_sha256",
]


class ExportError(ValueError):
    """Base class of every error raised while saving or loading an export."""


class CorruptExportError(ExportError):
    """Not an export, truncated file, checksum mismatch or unparsable header."""


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


def _arch_config(learned_opt: LearnedOptimizer, architecture_only: bool = False) -> dict[str, Any]:
    try:
        config = config_of(learned_opt, architecture_only=architecture_only)
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
    return {
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
    }


def _lopt_version() -> str | None:
    try:
        return importlib.metadata.version("lopt")
    except importlib.metadata.PackageNotFoundError:
        return None


def tensors_sha256(tensors: dict[str, np.ndarray]) -> str:
    """Hex SHA-256 of the canonical bytes of named tensors (docs/export-format.md, section 4):
    per tensor in sorted name order, ``[name, dtype, shape]`` as compact JSON and a newline,
    then its raw little-endian C-order bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        line = json.dumps([name, a.dtype.name, list(a.shape)], separators=(",", ":")) + "\n"
        h.update(line.encode("utf-8"))
        h.update(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes(order="C"))
    return h.hexdigest()


def _tensor_name(path: tuple[str, ...]) -> str:
    return "/".join(path)


# --- writing -----------------------------------------------------------------------------------


def _atomic_write(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    prefix = "." + os.path.basename(path) + "."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
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


def save(
    path: str | os.PathLike,
    learned_opt: LearnedOptimizer,
    meta_params: MetaParams,
    metadata: dict | None = None,
) -> str:
    """Write ``learned_opt`` and its ``meta_params`` to the safetensors file ``path`` (atomically).

    ``path`` is used as given (``.safetensors`` is the conventional suffix). ``metadata`` is an
    optional JSON-able dict stored in the header (e.g. the outer step, the task family, the
    final meta-loss). The meta-params must have the structure, shapes and dtypes of
    ``learned_opt.init(key)``, else :class:`ArchitectureMismatchError` is raised before any file
    is touched. Returns the path written, as a string.
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

    host = jax.tree.map(np.asarray, jax.device_get(meta_params))
    leaves = _flatten(flax.serialization.to_state_dict(host))
    for p, leaf in leaves.items():
        if not isinstance(leaf, np.ndarray):
            raise ExportError(
                f"meta-param leaf '{_fmt_path(p)}' is a {type(leaf).__name__}, not an array"
            )
    got = {p: _spec(v) for p, v in leaves.items()}
    want = _specs(_template(learned_opt))
    _check_leaves(got, want, "the meta-params", arch, f"the export to {path}")

    tensors: dict[str, np.ndarray] = {}
    for p, leaf in leaves.items():
        tname = _tensor_name(p)
        if not tname or tname in tensors:  # a root leaf, or keys that contain "/"
            raise ExportError(
                f"meta-param leaf '{_fmt_path(p)}' has no unique tensor name ('{tname}'); "
                "meta-params must be nested dicts/lists whose keys do not contain '/'"
            )
        tensors[tname] = np.array(leaf, order="C")  # (ascontiguousarray makes 0-d 1-d)
    header = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "architecture": name,
        "config": json.dumps(config),
        "tensors_sha256": tensors_sha256(tensors),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "lopt_version": _lopt_version() or "",
        "library_versions": json.dumps(_library_versions()),
        "metadata": json.dumps(metadata),
    }
    try:
        data = safetensors.numpy.save(tensors, metadata=header)
    except Exception as e:  # e.g. a dtype safetensors cannot store
        raise ExportError(f"cannot write the meta-params as safetensors: {e}") from e
    _atomic_write(path, data)
    return path


# --- reading: common ---------------------------------------------------------------------------


def _corrupt(path: str, why: str) -> CorruptExportError:
    return CorruptExportError(f"learned-optimizer export {path} is corrupted or truncated: {why}")


def _unsupported(path: str, version: int, made_by: str | None) -> UnsupportedFormatError:
    by = f" (written by lopt {made_by})" if made_by else ""
    return UnsupportedFormatError(
        f"learned-optimizer export {path} has format_version {version}{by}, but this lopt reads "
        f"versions up to {FORMAT_VERSION}; upgrade lopt to load it"
    )


def _rebuild(name: str, config: dict, path: str) -> LearnedOptimizer:
    try:
        return lopt.get(name, **config)
    except Exception as e:  # unknown name, unknown option, invalid value
        raise ExportError(
            f"cannot rebuild the architecture {_describe(name, config)} of {path} with this "
            f"lopt: {e}"
        ) from e


def _resolve_architecture(
    name: str, config: dict, learned_opt: LearnedOptimizer | None, path: str
) -> LearnedOptimizer:
    """The file's architecture, rebuilt; or ``learned_opt`` if it is the same one."""
    if learned_opt is None:
        return _rebuild(name, config, path)
    # Execution options (lopt.base.EXECUTION_OPTION, e.g. mlp's ``fused``) are not compared:
    # an export loads into the same architecture run either way.
    req_name, req_config = learned_opt.name, _arch_config(learned_opt, architecture_only=True)
    file_config = config
    if req_name == name:
        # Compare with the file's architecture as this code builds it, so options added (with
        # defaults) since the export was written do not count as a difference.
        try:
            file_config = _arch_config(lopt.get(name, **config), architecture_only=True)
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
            f"export {path} holds {_describe(name, config)} but "
            f"{_describe(req_name, req_config)} was requested{diff}"
        )
    return learned_opt


def _read_safetensors_header(f, path: str) -> tuple[dict, dict, int]:
    """Parse the safetensors framing of the open file ``f`` up to the end of its JSON header;
    return (``__metadata__``, tensor table, offset of the tensor data). The tensor table is
    checked against the data by :func:`_check_data_extent`."""
    size = os.fstat(f.fileno()).st_size
    raw_len = f.read(_LEN.size)
    if len(raw_len) < _LEN.size:
        raise _corrupt(
            path, f"the file has {len(raw_len)} bytes, fewer than a safetensors header length"
        )
    (n,) = _LEN.unpack(raw_len)
    if n > size - _LEN.size:
        raise _corrupt(path, f"the header claims {n} bytes but only {size - _LEN.size} follow")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _corrupt(
            path, f"the safetensors header is not valid UTF-8 JSON ({e}); is it a lopt export?"
        ) from None
    if not isinstance(header, dict):
        raise _corrupt(path, "the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())
    ):
        raise _corrupt(path, "the safetensors __metadata__ is not a string-to-string object")
    return meta or {}, header, _LEN.size + n


def _check_data_extent(table: dict, data_len: int, path: str) -> None:
    """Every tensor's offsets lie in the data, match its shape and dtype, and the tensors cover
    the data exactly (safetensors' own rule: no holes, nothing after)."""
    spans = []
    for tname, entry in table.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            size = _ST_DTYPES[dtype][1] * int(np.prod([int(d) for d in shape], dtype=np.int64))
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError) as e:
            raise _corrupt(path, f"tensor '{tname}' has a malformed header entry ({e!r})") from None
        if end - begin != size or begin < 0:
            raise _corrupt(
                path, f"tensor '{tname}' spans bytes [{begin}, {end}) but its shape needs {size}"
            )
        spans.append((begin, end))
    spans.sort()
    pos = 0
    for begin, end in spans:
        if begin != pos:
            raise _corrupt(path, "the tensors' byte ranges overlap or leave holes")
        pos = end
    if data_len < pos:
        raise _corrupt(path, f"the tensor data has {data_len} of its {pos} bytes")
    if data_len > pos:
        raise _corrupt(path, f"{data_len - pos} unexpected bytes follow the payload")


def _decode_metadata(meta: dict, path: str) -> dict:
    """The format-2 ``__metadata__`` as :func:`read_metadata` returns it (JSON decoded)."""
    if meta.get("format") != FORMAT_NAME:
        raise _corrupt(
            path,
            f"it is a safetensors file without lopt's metadata (format is "
            f"{meta.get('format')!r}, not {FORMAT_NAME!r}); is it a lopt export?",
        )
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise _corrupt(
            path, f"format_version {meta.get('format_version')!r} is not an integer"
        ) from None
    if version > FORMAT_VERSION:
        raise _unsupported(path, version, meta.get("lopt_version"))
    if version < 2:
        raise _corrupt(path, f"a safetensors export cannot have format_version {version}")
    missing = [k for k in METADATA_KEYS if k not in meta]
    if missing:
        raise _corrupt(path, f"the metadata lacks {', '.join(missing)}")
    try:
        config = json.loads(meta["config"])
        library_versions = json.loads(meta["library_versions"])
        user_metadata = json.loads(meta["metadata"])
    except ValueError as e:
        raise _corrupt(path, f"a JSON value of the metadata does not parse ({e})") from None
    if not isinstance(config, dict):
        raise _corrupt(path, "the metadata's config is not a JSON object")
    return {
        "format": FORMAT_NAME,
        "format_version": version,
        "architecture": {"name": meta["architecture"], "config": config},
        "tensors_sha256": meta["tensors_sha256"],
        "created": meta["created"],
        "lopt_version": meta["lopt_version"] or None,
        "library_versions": library_versions,
        "metadata": user_metadata,
    }


def _leaves_table(table: dict) -> list[dict]:
    """The tensor table as :func:`read_metadata`'s ``meta_params.leaves``: path, shape, numpy
    dtype name."""
    return [
        {
            "path": tname.split("/"),
            "shape": [int(d) for d in entry["shape"]],
            "dtype": _ST_DTYPES[entry["dtype"]][0],
        }
        for tname, entry in sorted(table.items())
    ]


def _read_header(f, path: str) -> dict:
    """The decoded header (what :func:`read_metadata` returns), with the private keys
    ``_table`` and ``_offset``."""
    meta, table, offset = _read_safetensors_header(f, path)
    header = _decode_metadata(meta, path)
    _check_data_extent(table, os.fstat(f.fileno()).st_size - offset, path)
    header["meta_params"] = {"leaves": _leaves_table(table)}
    header["_table"], header["_offset"] = table, offset
    return header


def _public(header: dict) -> dict:
    return {k: v for k, v in header.items() if not k.startswith("_")}


def read_metadata(path: str | os.PathLike) -> dict:
    """The export's header, decoded: ``format_version``, ``architecture`` (``{"name", "config"}``),
    ``meta_params`` (``{"leaves": [{"path", "shape", "dtype"}, ...]}``), ``created``,
    ``lopt_version``, ``library_versions``, ``metadata`` (the user's dict), and the checksum
    (``tensors_sha256``).

    Reads only the header, not the arrays; the checksum is not verified.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        return _public(_read_header(f, path))


def _load_arrays_format2(
    data: bytes, header: dict, path: str
) -> dict[tuple[str, ...], np.ndarray]:
    try:
        tensors = safetensors.numpy.load(data)
    except Exception as e:  # safetensors' own validation (SafetensorError)
        raise _corrupt(path, f"safetensors cannot decode it ({e})") from None
    digest = tensors_sha256(tensors)
    if digest != header["tensors_sha256"]:
        raise _corrupt(
            path,
            f"tensors sha256 {digest} differs from the metadata's {header['tensors_sha256']}",
        )
    return {tuple(name.split("/")): a for name, a in tensors.items()}


def _unflatten_like(template_state: Any, arrays: dict[tuple[str, ...], Any], prefix=()) -> Any:
    """``arrays`` (path -> array) arranged in the nested dicts of ``template_state``."""
    if isinstance(template_state, dict):
        return {
            k: _unflatten_like(v, arrays, prefix + (str(k),)) for k, v in template_state.items()
        }
    return arrays[prefix]


def load(
    path: str | os.PathLike, learned_opt: LearnedOptimizer | None = None
) -> tuple[LearnedOptimizer, MetaParams]:
    """Load ``(learned_opt, meta_params)`` from an export, a safetensors file written by
    :func:`save`.

    With ``learned_opt=None`` the architecture is rebuilt from the file's name and config via
    ``lopt.get``. With ``learned_opt`` given, its name and config must equal the file's, else
    :class:`ArchitectureMismatchError`; the given object is returned. The checks, in order, and
    the errors they raise: docs/export-format.md, section 5.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        header = _read_header(f, path)
        f.seek(0)
        data = f.read()
    arrays = _load_arrays_format2(data, header, path)

    name = header["architecture"]["name"]
    config = header["architecture"]["config"]
    learned_opt = _resolve_architecture(name, config, learned_opt, path)
    arch = _describe(learned_opt.name, _arch_config(learned_opt))
    template = _template(learned_opt)
    want = _specs(template)
    _check_leaves(
        {p: _spec(v) for p, v in arrays.items()}, want, "the export's meta-params", arch, path
    )
    state = _unflatten_like(flax.serialization.to_state_dict(template), arrays)
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
