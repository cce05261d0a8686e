"""What the checkpoint tests share: small states, tree and folder comparisons, ways to damage a file."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnet import checkpoint as C
from jaxnet.models import create_model
from jaxnet.state import create_train_state


def train_state(model: str = "mlp128", tx=None, seed: int = 0):
    """A TrainState at step 3 whose Adam moments are non-trivial, so that a wrong restore would show."""
    tx = tx or optax.adam(1e-3)
    _, state = create_train_state(create_model(model, seed=seed), tx, seed=seed)
    grads = jax.tree.map(jnp.ones_like, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(
        step=jnp.asarray(3, jnp.int32), params=optax.apply_updates(state.params, updates), opt_state=opt_state
    )


def equal_trees(a, b) -> bool:
    """Same number of leaves, each with the same dtype and the same values."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(la, lb)
    )


def all_files(root: pathlib.Path) -> dict[str, bytes]:
    """``{relative path: bytes}`` of every file under ``root``."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def largest_file(folder: pathlib.Path) -> pathlib.Path:
    """The biggest data file of a step folder (its manifest aside)."""
    return max(
        (p for p in folder.rglob("*") if p.is_file() and p.name != C.MANIFEST_FILE), key=lambda p: p.stat().st_size
    )


def flip_middle_byte(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def tmp_dirs(directory: pathlib.Path) -> list[pathlib.Path]:
    """The temporary folders of unfinished saves in a checkpoint folder."""
    return sorted(directory.glob("*.orbax-checkpoint-tmp*")) if directory.is_dir() else []


def dict_state(value: float = 1.0, n: int = 30_000, *, noisy: bool = False) -> dict:
    """A small TrainState-like dict (120 KB of params): two fit a 200 KB disk, three do not.

    ``noisy`` makes the parameters incompressible, for Orbax's format, which
    compresses a constant array to almost nothing.
    """
    w = np.full(n, value, np.float32)
    if noisy:
        w += np.random.default_rng(int(value)).random(n, dtype=np.float32)
    return {"step": np.asarray(1, np.int32), "params": {"w": w}, "opt_state": {"mu": np.zeros(8, np.float32)}}
