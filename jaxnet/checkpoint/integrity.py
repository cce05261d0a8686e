"""SHA-256 digests that make damage visible: of parameters, of files, of records.

:func:`params_sha256` lets two runs be compared from outside (the ``--json``
summary's ``params_sha256``). The rest is what :mod:`jaxnet.checkpoint`
records when it saves and checks when it restores, so that a flipped byte or
a truncated file is reported instead of restored as garbage:

* a *record*: the JSON saved beside the arrays, holding the caller's meta,
  the metrics, the shapes/dtypes and SHA-256 of each part of the state, and
  the SHA-256 of the record itself;
* a *manifest*: the size and SHA-256 of every file of a checkpoint folder.

The checking functions return a description of the first problem found, or
``None``; the caller turns it into an error that names the step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
import pathlib
from collections.abc import Collection, Mapping
from typing import Any

import jax
import numpy as np

from jaxnet.errors import ConfigError

MANIFEST_FILE = "jaxnet_sha256.json"  # per-file SHA-256, inside each checkpoint folder
# Orbax rewrites these two after the manifest is written (commit time stamp,
# commit marker); neither affects the restored values, so they are not hashed.
UNHASHED = ("_CHECKPOINT_METADATA", "commit_success.txt")
RECORD_FORMAT = 1


def params_sha256(params: Any) -> str:
    """SHA-256 of a pytree of arrays, to compare two runs' results from outside.

    Definition: the leaves of ``params`` are taken in ``jax.tree.leaves``
    order (for an ``nnx.State``: sorted by module path, then variable name);
    each is converted with ``np.asarray`` and contributes its raw bytes in C
    order and native byte order (``np.asarray(x).tobytes()``, little-endian
    on x86 and ARM); the digest is the hex SHA-256 of their concatenation.
    A typed PRNG key array (dtype ``key<fry>``, e.g. the value of the
    ``nnx.RngKey`` that an ``nnx.Dropout(rate, rngs=rngs)`` holds) has no
    NumPy form: it contributes the bytes of its key data,
    ``np.asarray(jax.random.key_data(x)).tobytes()`` (uint32, shape
    ``(*x.shape, 2)`` for threefry), which is also what a checkpoint stores
    (:func:`key_data_tree`), so a state and its saved copy hash alike.
    Shapes and dtypes are not hashed, only the bytes, so two runs agree
    exactly when every parameter is bit-identical.

    Args:
        params: any pytree of arrays (typed PRNG keys included), e.g.
            ``state.params`` or a whole ``TrainState``.

    Returns:
        64 lowercase hex digits.

    Example:
        >>> import numpy as np
        >>> params_sha256({"w": np.zeros(2, np.float32)})[:16]
        'af5570f5a1810b7a'
    """
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(key_data_tree(params)):
        digest.update(np.asarray(leaf).tobytes())
    return digest.hexdigest()


def is_prng_key(x: Any) -> bool:
    """Whether ``x`` (an array or a ``jax.ShapeDtypeStruct``) is a typed PRNG key array."""
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_data(x: Any) -> Any:
    if not is_prng_key(x):
        return x
    if isinstance(x, jax.ShapeDtypeStruct):  # an abstract key: the struct of its data, same placement
        data = jax.eval_shape(jax.random.key_data, x)
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=x.sharding)
    return jax.random.key_data(x)


def key_data_tree(tree: Any) -> Any:
    """``tree`` with each typed PRNG key leaf replaced by its key data; other leaves as they are.

    How a state is stored and hashed: a key array of shape ``S`` (dtype
    ``key<fry>``) becomes ``jax.random.key_data(key)``, a uint32 array of
    shape ``(*S, 2)`` on the key's devices (a ``ShapeDtypeStruct`` of a key
    becomes that of its data). ``jax.random.wrap_key_data(data,
    dtype=key.dtype)`` turns it back into the same key.

    >>> key_data_tree({"key": jax.random.key(0)})["key"].dtype
    dtype('uint32')
    """
    return jax.tree.map(_key_data, tree)


def state_parts(state: Any) -> dict[str, Any]:
    """A state's top-level parts (a dataclass's fields, a dict's items), each digested on its own."""
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    if isinstance(state, Mapping):
        return {str(k): v for k, v in state.items()}
    return {"state": state}


def tree_shapes(tree: Any) -> list[list[Any]]:
    """``[[shape, dtype name], ...]`` of a pytree's leaves, in tree order; PRNG keys as their key data."""
    return [[list(np.shape(x)), str(np.dtype(x.dtype))] for x in jax.tree.leaves(key_data_tree(tree))]


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def file_sha256(path: pathlib.Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def record_header(meta: Mapping[str, Any], metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """The state-independent part of a record: a detached, validated JSON copy of meta and metrics.

    Cheap (no arrays are read), so :func:`jaxnet.checkpoint.save` calls it
    before returning: bad meta fails at once, and the caller may change its
    dicts and lists afterwards without affecting the save in progress.

    Raises:
        ConfigError: ``meta`` is not a dict, or ``meta``/``metrics`` are not JSON.
    """
    if not isinstance(meta, Mapping):
        raise ConfigError(f"checkpoint meta must be a dict, got {type(meta).__name__}")
    header = {
        "format": RECORD_FORMAT,
        "meta": dict(meta),
        "metrics": None
        if metrics is None
        else {
            str(k): float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else v
            for k, v in metrics.items()
        },
    }
    try:
        return json.loads(_canonical(header))
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"checkpoint meta and metrics must be JSON (dicts, lists, str, int, float, bool, None): "
            f"{exc}; convert arrays with float(x) or x.tolist()"
        ) from None


def finish_record(header: dict[str, Any], state: Any) -> dict[str, Any]:
    """``header`` (from :func:`record_header`) completed with the state's shapes and digests.

    Reads every array of ``state`` (a host copy; it waits for pending
    computations); hashing releases the GIL, so a background thread can do it.
    """
    parts = state_parts(state)
    body = dict(header)
    body["state_sha256"] = {k: params_sha256(v) for k, v in parts.items()}
    body["state_shapes"] = {k: tree_shapes(v) for k, v in parts.items()}
    body["record_sha256"] = hashlib.sha256(_canonical(body).encode()).hexdigest()
    return body


def make_record(state: Any, meta: Mapping[str, Any], metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """The JSON saved beside a state: meta, metrics, and the state's shapes and digests.

    Reads every array of ``state`` (a host copy; it waits for pending computations).

    Raises:
        ConfigError: ``meta`` is not a dict, or ``meta``/``metrics`` are not JSON.
    """
    return finish_record(record_header(meta, metrics), state)


def record_problem(record: Any) -> str | None:
    """What is wrong with a record read back, or ``None`` when it is intact."""
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        return "holds no jaxnet record (it was not written by jaxnet.checkpoint.save)"
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    if hashlib.sha256(_canonical(body).encode()).hexdigest() != record.get("record_sha256"):
        return "does not match its recorded SHA-256"
    return None


def _brief(shapes: list[list[Any]] | None) -> str:
    shapes = shapes or []
    text = ", ".join(f"{tuple(s)} {d}" for s, d in shapes[:4])
    return f"{len(shapes)} arrays [{text}{', ...' if len(shapes) > 4 else ''}]"


def shapes_problem(record: dict[str, Any], target: Any, names: Collection[str]) -> str | None:
    """How ``target``'s parts ``names`` differ in shapes/dtypes from the recorded ones, or ``None``."""
    parts = state_parts(target)
    for name in names:
        saved, wanted = record["state_shapes"].get(name), tree_shapes(parts[name])
        if saved != wanted:
            return f"its {name} part has {_brief(saved)}, the state to restore into has {_brief(wanted)}"
    return None


def digest_problem(record: dict[str, Any], restored: Any, names: Collection[str]) -> str | None:
    """The first part among ``names`` whose restored arrays differ from the saved ones, or ``None``."""
    parts = state_parts(restored)
    for name in names:
        if params_sha256(parts[name]) != record["state_sha256"].get(name):
            return name
    return None


def write_manifest(folder: pathlib.Path, step: int) -> None:
    """Writes ``folder/jaxnet_sha256.json``: the size and SHA-256 of every file under ``folder``.

    Raises:
        OSError: the folder cannot be read or written.
    """
    files = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_file() and name not in (*UNHASHED, MANIFEST_FILE):
            files[name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    text = json.dumps({"step": step, "files": files}, indent=1)
    (folder / MANIFEST_FILE).write_text(text, encoding="utf-8")


def manifest_problem(folder: pathlib.Path) -> str | None:
    """The first missing, resized or altered file of ``folder`` per its manifest, or ``None``.

    A folder without a manifest has nothing to check here (``None``).
    """
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        items = [(folder / name, int(e["size"]), str(e["sha256"])) for name, e in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        return f"{manifest} is unreadable ({type(exc).__name__}: {exc})"
    for path, size, sha256 in items:
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, {size} were written (truncated or overwritten)"
        if file_sha256(path) != sha256:
            return f"the bytes of {path} changed after it was written (SHA-256 mismatch)"
    return None
