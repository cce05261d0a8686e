"""Exporting: a model's eval-mode forward function, lowered with ``jax.export``, and its file.

:func:`make_forward` turns ``nnx.split`` state into ``fn(weights, inputs)``
(preprocessing included, RNG variables replaced by placeholders),
:func:`lower_forward` lowers it for a symbolic batch size ``b``, and
:func:`export_model` packs the lowered module and the weights into the bytes
of a ``model.jaxexport`` file (the format: :mod:`jaxnet.export`). flax is
imported only by :func:`make_forward`; reading a file back needs none of this.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet.errors import ConfigError, DataError
from jaxnet.outputs import OUTPUT_KINDS

EXPORT_FORMAT = 1
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # what jax.export lowers for
_KEY_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")  # jax.random's key implementations

Transform = Callable[[jax.Array, jax.Array, bool], jax.Array]  # transform(key, images, train)


def _check_export_args(input_shape: Sequence[int], platforms: Sequence[str], output: str) -> tuple[int, ...]:
    shape = tuple(input_shape)
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ConfigError(
            f"input_shape must be positive integers, one example's shape (e.g. (28, 28, 1)), got {input_shape!r}"
        )
    bad = [p for p in platforms if p not in PLATFORMS]
    if bad or not platforms:
        raise ConfigError(f"unknown export platform(s) {bad or list(platforms)}; choose from {PLATFORMS}")
    if output not in OUTPUT_KINDS:
        raise ConfigError(f"unknown model output kind {output!r}; expected one of {OUTPUT_KINDS}")
    return shape


def _key_name(key: Any) -> str | int:
    """A path element as a plain name: a dict key, an attribute or an index."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            value = getattr(key, attr)
            return value if isinstance(value, int) and not isinstance(value, bool) else str(value)
    return str(key)


def _is_key(dtype: Any) -> bool:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_impl(dtype_name: str) -> tuple[str, Any]:
    """``(implementation name, dtype)`` of the PRNG key dtype named ``dtype_name`` (e.g. ``key<fry>``)."""
    for impl in _KEY_IMPLS:
        dtype = jax.eval_shape(lambda i=impl: jax.random.key(0, impl=i)).dtype
        if str(dtype) == dtype_name:
            return impl, dtype
    raise DataError(f"unknown PRNG key dtype {dtype_name!r}; this jax knows {', '.join(_KEY_IMPLS)}")


def _variables(params: Any, model_state: Any) -> list[dict[str, Any]]:
    """Every leaf of ``(params, model_state)``: its part, path, shape and dtype name (JSON)."""
    out = []
    for part, tree in (("params", params), ("model_state", model_state)):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            out.append(
                {
                    "part": part,
                    "path": [_key_name(k) for k in path],
                    "shape": [int(d) for d in np.shape(leaf)],
                    "dtype": str(leaf.dtype),
                }
            )
    return out


def _part_name(key: Any) -> str:
    """The part a leaf of the flattened ``(params, model_state)`` pair is in: its path starts with the tuple index."""
    return ("params", "model_state")[int(key.idx)]


def _weight_name(part: str, path: Sequence[Any]) -> str:
    return "/".join([part, *(str(_key_name(k)) for k in path)])


@dataclasses.dataclass(frozen=True)
class Forward:
    """A model's evaluation-mode forward function, its weights taken as arguments.

    Attributes:
        fn: ``fn(weights, inputs) -> outputs``; ``weights`` is a list in the
            order of ``names``, ``inputs`` raw ``(B, *input_shape)`` examples
            (the preprocessing is inside).
        names: each weight's name, ``params/fc1/kernel/value`` style: the
            part (``params`` or ``model_state``) and the path in it, as in a
            checkpoint's ``arrays.npz``.
        specs: each weight's shape and dtype.
        variables: every leaf of ``(params, model_state)`` (see
            :func:`_variables`), RNG variables included: what a checkpoint of
            the run holds.
    """

    fn: Callable[[list[jax.Array], jax.Array], jax.Array]
    names: tuple[str, ...]
    specs: tuple[jax.ShapeDtypeStruct, ...]
    variables: tuple[dict[str, Any], ...]


def make_forward(
    graphdef: Any,
    params: Any,
    model_state: Any,
    *,
    transform: Transform | None = None,
) -> Forward:
    """The eval-mode predict function of a model, its preprocessing included (nothing is compiled).

    RNG variables (``nnx.RngKey``/``nnx.RngCount``, which Flax's
    ``nnx.Dropout(rate, rngs=rngs)`` keeps in the model state) are not
    weights: evaluation mode draws no random numbers, so inside ``fn`` they
    are placeholders of their shape and dtype, and typed key arrays never
    cross the exported function's boundary.

    Args:
        graphdef: the model's graph definition (``nnx.split``).
        params: its ``nnx.Param`` state; arrays or ``ShapeDtypeStruct`` leaves
            (only shapes and dtypes are read, so sharded states are fine).
        model_state: every other variable (BatchNorm statistics, RNG state).
        transform: the run's on-device preprocessing, applied with ``train=False``.

    Returns:
        A :class:`Forward`.
    """
    from flax import nnx  # only exporting needs the model's framework

    rng_state, kept = nnx.split_state(model_state, nnx.RngState, ...)
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path((params, kept))
    names = tuple(_weight_name(_part_name(path[0]), path[1:]) for path, _ in leaves_with_paths)
    specs = tuple(jax.ShapeDtypeStruct(np.shape(w), w.dtype) for _, w in leaves_with_paths)
    rng_leaves, rng_treedef = jax.tree.flatten(rng_state)
    rng_specs = [jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x in rng_leaves]

    def placeholder(spec: jax.ShapeDtypeStruct) -> jax.Array:
        if not _is_key(spec.dtype):
            return jnp.zeros(spec.shape, spec.dtype)
        data = jax.eval_shape(jax.random.key_data, spec)
        return jax.random.wrap_key_data(jnp.zeros(data.shape, data.dtype), impl=_key_impl(str(spec.dtype))[0])

    def fn(weights: list[jax.Array], inputs: jax.Array) -> jax.Array:  # inputs: (b, *input_shape)
        params_, kept_ = jax.tree.unflatten(treedef, weights)
        rngs = jax.tree.unflatten(rng_treedef, [placeholder(s) for s in rng_specs])
        model = nnx.merge(graphdef, params_, kept_, rngs)
        model.eval()  # model.eval(): dropout off, BatchNorm on running statistics
        if transform is not None:  # transforms ignore the key when train=False
            inputs = transform(jax.random.PRNGKey(0), inputs, False)
        return model(inputs)

    return Forward(fn, names, specs, tuple(_variables(params, model_state)))


def lower_forward(
    forward: Forward,
    *,
    input_shape: Sequence[int],
    input_dtype: str,
    platforms: Sequence[str] = ("cpu", "cuda"),
) -> Any:
    """Lowers a :class:`Forward` with ``jax.export`` for a symbolic batch size ``b``.

    Returns:
        The ``jax.export.Exported``.

    Raises:
        ConfigError: the model cannot take ``(b, *input_shape)`` inputs (the
            first line of the model's error is shown).
    """
    shape, dtype = tuple(input_shape), np.dtype(input_dtype)
    (batch,) = jax.export.symbolic_shape("b")
    specs = (list(forward.specs), jax.ShapeDtypeStruct((batch, *shape), dtype))
    try:
        return jax.export.export(jax.jit(forward.fn), platforms=tuple(platforms))(*specs)
    except Exception as exc:  # shape errors from inside the model's layers
        raise ConfigError(
            f"cannot export the model for inputs (b, {', '.join(map(str, shape))}) {dtype}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None


def _describe(
    exported: Any,
    *,
    names: Sequence[str],
    input_shape: Sequence[int],
    input_dtype: str,
    output: str,
    metadata: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The JSON description (``info``) of a ``model.jaxexport`` file (see :mod:`jaxnet.export`)."""
    out = exported.out_avals[0]
    return {
        "format": EXPORT_FORMAT,
        "input_shape": list(input_shape),
        "input_dtype": np.dtype(input_dtype).name,
        "output": output,
        "num_outputs": int(out.shape[-1]) if len(out.shape) > 1 else 1,
        "platforms": list(exported.platforms),
        "jax_version": jax.__version__,
        "weights": list(names),
        "metadata": dict(metadata or {}),
    }


def _pack(exported: Any, weights: Sequence[np.ndarray], info: Mapping[str, Any]) -> bytes:
    """The bytes of a ``model.jaxexport`` file: the module, ``info`` and the weights in its order."""
    try:
        info_bytes = json.dumps(info).encode()
    except TypeError as exc:
        raise ConfigError(f"export metadata must be JSON: {exc}") from None
    # Any: numpy's stubs would match `**arrays` against np.savez's `allow_pickle: bool`.
    arrays: dict[str, Any] = {
        "module": np.frombuffer(bytes(exported.serialize()), np.uint8),
        "info": np.frombuffer(info_bytes, np.uint8),
    }
    arrays.update({f"w{i:04d}": np.asarray(w) for i, w in enumerate(weights)})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _default_dtype(input_dtype: Any, transform: Any) -> str:
    if input_dtype is None:  # (not `or`: an np.dtype is falsy)
        input_dtype = "uint8" if transform is not None else "float32"
    return np.dtype(input_dtype).name


def export_model(
    graphdef: Any,
    state: Any,
    *,
    input_shape: Sequence[int],
    transform: Transform | None = None,
    input_dtype: str | None = None,
    output: str = "logits",
    platforms: Sequence[str] = ("cpu", "cuda"),
    metadata: Mapping[str, Any] | None = None,
) -> bytes:
    """Serializes the trained model's predict function, weights included.

    Counterpart of ``torch.jit.trace(model.eval(), example).save(path)``.

    Args:
        graphdef: the model's graph definition (from ``create_train_state``).
        state: a :class:`~jaxnet.state.TrainState`; only ``params`` and
            ``model_state`` are read.
        input_shape: one example's shape, e.g. ``(28, 28, 1)``; the batch
            size stays symbolic.
        transform: the training run's on-device preprocessing (e.g.
            ``jaxnet.data.transforms.make_image_transform(mean, std)``), applied with
            ``train=False`` inside the exported function.
        input_dtype: dtype the exported function takes; default ``"uint8"``
            (raw pixels) with a ``transform``, ``"float32"`` without.
        output: what the model returns, which decides how
            :func:`predict_files` reads it: ``"logits"``, ``"log_probs"``,
            ``"binary"`` (one logit: probability ``sigmoid``), or values
            (``"regression"``, ``"l1"``, ``"huber"``).
        platforms: lower for these platforms together.
        metadata: JSON-serializable facts stored in the file (model name,
            data set, step, ``params_sha256``...).

    Returns:
        The bytes of a ``model.jaxexport`` file.

    Raises:
        ConfigError: bad arguments, or a model that cannot take ``input_shape``.
    """
    shape = _check_export_args(input_shape, platforms, output)
    dtype = _default_dtype(input_dtype, transform)
    forward = make_forward(graphdef, state.params, state.model_state, transform=transform)
    exported = lower_forward(forward, input_shape=shape, input_dtype=dtype, platforms=platforms)
    weights = _named_arrays(state.params, state.model_state)
    info = _describe(
        exported, names=forward.names, input_shape=shape, input_dtype=dtype, output=output, metadata=metadata
    )
    return _pack(exported, [weights[n] for n in forward.names], info)


def _named_arrays(params: Any, model_state: Any) -> dict[str, np.ndarray]:
    """``{weight name: host array}`` of ``(params, model_state)``, RNG leaves left out."""
    arrays = {}
    for part, tree in (("params", params), ("model_state", model_state)):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if not _is_key(leaf.dtype):
                arrays[_weight_name(part, path)] = np.asarray(leaf)
    return arrays
