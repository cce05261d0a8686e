"""The ``arrays.npz`` item format: a state held whole by one process, as one uncompressed NumPy archive.

``create_checkpoint_manager(array_format="npz")`` writes the ``state`` item
of each step as ``<step>/state/arrays.npz``, each array under its path in
the state (``params/fc1/kernel/value``), so ``np.load`` reads a checkpoint
without jaxnet or Orbax. It costs less CPU per save than Orbax's own format,
which pays a fixed cost per array for its multi-host machinery (the figures
are in ``benchmarks/CHECKPOINTS.md``); but plain Orbax cannot open it, which
is why the default is Orbax's format. A state spread over several processes
is written in Orbax's format whatever the setting: :class:`NpzHandler` wraps
Orbax's ``StandardCheckpointHandler`` and the arguments of each call choose.

The rest of the module maps between a pytree and those flat names, for
writing (:func:`flat_arrays`) and for putting arrays read back into the
target's structure (:func:`nest`, :func:`fill`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pathlib
import zipfile
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxnet.checkpoint.errors import CheckpointError, CheckpointMismatchError
from jaxnet.checkpoint.orbax_glue import first_line

ARRAYS_FILE = "arrays.npz"  # the state item's one file, in <step>/state/


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` (no pickles); a bad CRC or a cut-off file raises here, not later."""
    with np.load(os.fspath(path), allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


class NpzHandler(ocp.AsyncCheckpointHandler):
    """Orbax item handler of ``state`` in ``"npz"`` managers: :data:`ARRAYS_FILE`, or Orbax's format.

    :class:`NpzSave`/:class:`NpzRestore` read and write the archive;
    ``StandardSave``/``StandardRestore`` (a state spread over processes) go
    to the wrapped ``StandardCheckpointHandler``. The CheckpointManager
    around it is Orbax's, so the atomic commit (temporary folder, rename),
    retention and asynchronous writing are unchanged.
    """

    def __init__(self) -> None:
        self._standard = ocp.StandardCheckpointHandler()

    async def _write(self, path: Any, arrays: Mapping[str, np.ndarray]) -> None:
        # What np.savez does, without its keyword-argument names (a leaf
        # called "file" would clash) and without pickles.
        with zipfile.ZipFile(os.fspath(path), "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for key, array in arrays.items():
                with archive.open(key + ".npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, array, allow_pickle=False)

    async def async_save(self, directory: Any, args: Any) -> list[Any] | None:
        if not isinstance(args, NpzSave):
            return await self._standard.async_save(directory, args=args)
        return [
            ocp.future.CommitFutureAwaitingContractedSignals(
                self._write(directory / ARRAYS_FILE, args.arrays), name="jaxnet_npz_save"
            )
        ]

    def save(self, directory: Any, args: Any) -> None:
        if not isinstance(args, NpzSave):
            return self._standard.save(directory, args=args)
        asyncio.run(self._write(directory / ARRAYS_FILE, args.arrays))
        return None

    def restore(self, directory: Any, args: Any = None) -> Any:
        if not isinstance(args, NpzRestore):
            return self._standard.restore(directory, args=args)
        return load_npz(directory / ARRAYS_FILE)

    def finalize(self, directory: Any) -> None:
        if not (directory / ARRAYS_FILE).exists():
            self._standard.finalize(directory)  # Orbax's format (merges the OCDBT files)

    def metadata(self, directory: Any) -> Any:
        return None if (directory / ARRAYS_FILE).exists() else self._standard.metadata(directory)

    def close(self) -> None:
        self._standard.close()


@ocp.args.register_with_handler(NpzHandler, for_save=True)
@dataclasses.dataclass
class NpzSave(ocp.args.CheckpointArgs):
    """Write these arrays, ``{"params/fc1/kernel/value": array, ...}``, as :data:`ARRAYS_FILE`."""

    arrays: dict[str, np.ndarray]


@ocp.args.register_with_handler(NpzHandler, for_restore=True)
@dataclasses.dataclass
class NpzRestore(ocp.args.CheckpointArgs):
    """Read :data:`ARRAYS_FILE` back as the flat dict it was written from."""


def read_npz(path: pathlib.Path, step: int) -> dict[str, np.ndarray]:
    """A step's :data:`ARRAYS_FILE`; damage (bad CRC, truncation) is a CheckpointError naming the file."""
    try:
        return load_npz(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"checkpoint step {step} is damaged: {path} cannot be read ({first_line(exc)})") from exc


def key_name(key: Any) -> Any:
    """The name of one step of a pytree path: a dict key, an attribute name or a sequence index."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return str(key)


def path_name(path: tuple[Any, ...]) -> str:
    """``"params/fc1/kernel/value"`` for a pytree path."""
    return "/".join(str(key_name(key)) for key in path)


def flat_arrays(state: Any) -> dict[str, np.ndarray] | None:
    """``{"params/fc1/kernel/value": array, ...}`` of a host state, or ``None`` if a path cannot be a key.

    ``None`` (Orbax's format is used instead) when a path element is empty or
    holds a ``/``, which would make the flat names ambiguous.
    """
    flat: dict[str, np.ndarray] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        parts = [str(key_name(key)) for key in path]
        if not parts or any(not part or "/" in part for part in parts):
            return None
        flat["/".join(parts)] = leaf
    return flat if len(flat) == len(jax.tree.leaves(state)) else None


def nest(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The nested dicts of :func:`flat_arrays`' names, for :func:`fill`."""
    root: dict[str, Any] = {}
    for key, array in flat.items():
        *parents, last = key.split("/")
        node = root
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[last] = array
    return root


def _as_dtype(array: np.ndarray, dtype: Any) -> np.ndarray:
    """``array`` viewed as ``dtype`` when it holds that dtype's raw bytes (``.npy`` stores ml_dtypes as ``|V2``)."""
    want = np.dtype(dtype)
    if array.dtype != want and array.dtype == np.dtype(f"V{want.itemsize}"):
        return array.view(want)
    return array


def fill(abstract: Any, raw: Any, step: int, what: str) -> Any:
    """Puts the arrays of a target-less read into ``abstract``'s structure, with its dtypes.

    Raises:
        CheckpointMismatchError: ``raw`` lacks an array of ``abstract``.
    """
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    leaves = []
    for path, ref in leaves_with_paths:
        node = raw
        for key in path:
            name = key_name(key)
            if isinstance(node, Mapping):
                node = node.get(name, node.get(str(name)))
            elif isinstance(node, (list, tuple)) and isinstance(name, int) and name < len(node):
                node = node[name]
            else:
                node = None
            if node is None:
                raise CheckpointMismatchError(
                    f"checkpoint step {step} has no {what} array {jax.tree_util.keystr(path)}; "
                    "restore with the model of the saved run"
                )
        array = np.asarray(node)
        leaves.append(_as_dtype(array, getattr(ref, "dtype", array.dtype)))
    return jax.tree.unflatten(treedef, leaves)


def with_recorded_dtypes(flat: dict[str, np.ndarray], state_shapes: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``flat`` (read without a target) with raw-byte arrays viewed as the dtypes a record lists.

    The record has each part's ``[shape, dtype]`` in the order of its arrays,
    which is their order in the file.
    """
    for part, shapes in state_shapes.items():
        keys = [key for key in flat if key.split("/")[0] == part]
        if len(keys) == len(shapes):
            for key, (_, dtype) in zip(keys, shapes):
                flat[key] = _as_dtype(flat[key], jnp.dtype(dtype))
    return flat
