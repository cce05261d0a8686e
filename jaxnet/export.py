"""A trained model as one file that runs without its Python code: ``jax.export``.

Counterpart of ``torch.jit.trace(model, x).save("model.pt")`` and
``torch.jit.load``. :func:`export_model` serializes the evaluation-mode
predict function -- preprocessing (``ToTensor`` + ``Normalize``) and the
model, with a symbolic batch size ``b`` -- as StableHLO for several platforms
at once (CPU and CUDA by default). :func:`load_exported` reloads it with
nothing but jax and numpy: neither :mod:`jaxnet.models` nor flax is imported,
so the model's code need not even be installed.

The file (``model.jaxexport``) is a numpy ``.npz`` archive, read with
``allow_pickle=False`` (nothing in it can run code): ``module`` holds the
serialized ``jax.export.Exported``, ``info`` a JSON description (input shape
and dtype, output kind, platforms, the run it came from), and ``w0000``,
``w0001``, ... the weights, passed to the module as arguments. Keeping the
weights out of the module keeps the computation identical to the live
``make_predict_fn`` one, so outputs match it bit for bit.

Inputs are raw pixels: ``uint8`` arrays ``(N, H, W, C)`` in 0..255, as read
from a PNG or an MNIST/CIFAR file; the normalization the model was trained
with is inside the exported function. (Models without preprocessing, such as
the linear regression or a model of tabular features, take ``float32``.)
Outputs are read by kind: class scores (``logits``, ``log_probs``, or one
``binary`` logit) or values (``regression``, ``l1``, ``huber``).

Any run can be exported, whatever model it trained: :func:`jaxnet.fit`
calls :func:`write_workdir_model` at the start of a run, which lowers the
forward function without its weights into ``W/model/`` (``forward.exported``
and ``model.json``: the weights' names, and the shapes and dtypes of every
variable a checkpoint holds). ``jaxnet export --workdir W`` restores the
chosen checkpoint's arrays in that order and writes the same
``model.jaxexport``. A workdir without ``model/`` (or an export for other
platforms) rebuilds the model from ``W/config.json`` instead: a jaxnet model
by name, or ``package.module:factory`` with its ``model_kwargs``, as
``jaxnet train`` built it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import logging
import os
import pathlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet.errors import ConfigError, DataError
from jaxnet.runconfig import CLASSIFIER_OUTPUTS, LOSSES, VALUE_OUTPUTS, HelpFormatter

EXPORT_FORMAT = 1
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
_OUTPUTS = (*CLASSIFIER_OUTPUTS, *VALUE_OUTPUTS)
MODEL_DIR = "model"  # under a run's workdir: its forward function, written by write_workdir_model
_MODEL_INFO = "model.json"  # W/model/: input, output kind, weight names and the run's variables
_MODEL_MODULE = "forward.exported"  # W/model/: the serialized jax.export.Exported
_KEY_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")  # jax.random's key implementations
_CONFIG_FILE = "config.json"  # jaxnet.checkpoint.workdir.CONFIG_FILE (not imported: the loader stays light)

logger = logging.getLogger("jaxnet.export")


# ---------------------------------------------------------------------------
# Export: the forward function, lowered; the file
# ---------------------------------------------------------------------------


def _check_export_args(input_shape: Sequence[int], platforms: Sequence[str], output: str) -> tuple[int, ...]:
    shape = tuple(input_shape)
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ConfigError(f"input_shape must be positive integers, one example's shape (e.g. (28, 28, 1)), got {input_shape!r}")
    bad = [p for p in platforms if p not in PLATFORMS]
    if bad or not platforms:
        raise ConfigError(f"unknown export platform(s) {bad or list(platforms)}; choose from {PLATFORMS}")
    if output not in _OUTPUTS:
        raise ConfigError(f"unknown model output kind {output!r}; expected one of {_OUTPUTS}")
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
            out.append({"part": part, "path": [_key_name(k) for k in path],
                        "shape": [int(d) for d in np.shape(leaf)], "dtype": str(leaf.dtype)})
    return out


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
    graphdef: Any, params: Any, model_state: Any, *,
    transform: Callable[[jax.Array, jax.Array, bool], jax.Array] | None = None,
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
    names = tuple(_weight_name(("params", "model_state")[_key_name(path[0])], path[1:]) for path, _ in leaves_with_paths)
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
    forward: Forward, *, input_shape: Sequence[int], input_dtype: str,
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


def _pack(exported: Any, weights: Sequence[np.ndarray], *, names: Sequence[str], input_shape: Sequence[int],
          input_dtype: str, output: str, metadata: Mapping[str, Any] | None) -> bytes:
    """The bytes of a ``model.jaxexport`` file (see the module docstring)."""
    out = exported.out_avals[0]
    info = {
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
    try:
        info_bytes = json.dumps(info).encode()
    except TypeError as exc:
        raise ConfigError(f"export metadata must be JSON: {exc}") from None
    arrays = {"module": np.frombuffer(bytes(exported.serialize()), np.uint8),
              "info": np.frombuffer(info_bytes, np.uint8)}
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
    transform: Callable[[jax.Array, jax.Array, bool], jax.Array] | None = None,
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
            ``jaxnet.train.make_image_transform(mean, std)``), applied with
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
    return _pack(exported, [weights[n] for n in forward.names], names=forward.names, input_shape=shape,
                 input_dtype=dtype, output=output, metadata=metadata)


def _named_arrays(params: Any, model_state: Any) -> dict[str, np.ndarray]:
    """``{weight name: host array}`` of ``(params, model_state)``, RNG leaves left out."""
    arrays = {}
    for part, tree in (("params", params), ("model_state", model_state)):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if not _is_key(leaf.dtype):
                arrays[_weight_name(part, path)] = np.asarray(leaf)
    return arrays


# ---------------------------------------------------------------------------
# The workdir's model: any model fit trained can be exported from its checkpoints
# ---------------------------------------------------------------------------


def write_workdir_model(
    workdir: str | os.PathLike,
    graphdef: Any,
    params: Any,
    model_state: Any,
    *,
    input_shape: Sequence[int],
    input_dtype: str | np.dtype | None = None,
    transform: Callable[[jax.Array, jax.Array, bool], jax.Array] | None = None,
    output: str = "logits",
    platforms: Sequence[str] = ("cpu", "cuda"),
) -> pathlib.Path | None:
    """Records how to run the model in ``workdir/model/``, so ``jaxnet export`` needs none of its code.

    What :func:`jaxnet.fit` calls at the start of a run with a workdir (in
    process 0 only). It lowers the forward function (:func:`make_forward`,
    eval mode, preprocessing included, symbolic batch size) without its
    weights and writes it with the names, shapes and dtypes of the run's
    variables; ``jaxnet export --workdir W`` then restores any checkpoint's
    arrays into it. Only shapes and dtypes are read, so nothing is copied off
    the devices; it costs one lowering, no compilation (tens of
    milliseconds for the tutorial models). Files are replaced atomically.

    Args:
        workdir: the run's workdir.
        graphdef, params, model_state: ``nnx.split(model, nnx.Param, ...)``
            (``TrainState.params``/``model_state``, sharded or not).
        input_shape: one example's shape, e.g. ``(28, 28, 1)``.
        input_dtype: the stored examples' dtype (``"uint8"`` pixels); default
            ``"uint8"`` with a ``transform``, ``"float32"`` without.
        transform: the run's preprocessing (``train=False`` is applied).
        output: the model's output kind, as for :func:`export_model`.
        platforms: platforms to lower for.

    Returns:
        The ``workdir/model`` folder, or ``None`` when the model cannot be
        lowered (logged as a warning; the run goes on, and ``jaxnet export``
        then rebuilds registered and ``module:factory`` models from the config).

    Raises:
        ConfigError: bad arguments (shape, platforms, output kind), or the
            folder cannot be written.
    """
    shape = _check_export_args(input_shape, platforms, output)
    dtype = _default_dtype(input_dtype, transform)
    folder = pathlib.Path(workdir) / MODEL_DIR
    try:
        forward = make_forward(graphdef, params, model_state, transform=transform)
        exported = lower_forward(forward, input_shape=shape, input_dtype=dtype, platforms=platforms)
    except ConfigError as exc:
        (folder / _MODEL_INFO).unlink(missing_ok=True)  # an earlier run's model is not this one
        logger.warning("cannot record the model for 'jaxnet export' (%s); training goes on", exc)
        return None
    module = bytes(exported.serialize())
    info = {"format": EXPORT_FORMAT, "input_shape": list(shape), "input_dtype": dtype, "output": output,
            "platforms": list(exported.platforms), "jax_version": jax.__version__,
            "module_sha256": hashlib.sha256(module).hexdigest(),
            "weights": list(forward.names), "variables": list(forward.variables)}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in ((_MODEL_MODULE, module), (_MODEL_INFO, json.dumps(info).encode())):
            tmp = folder / f".{name}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, folder / name)  # model.json last: it names the module's digest
    except OSError as exc:
        raise ConfigError(f"cannot write {folder}: {exc.strerror or exc}; choose a writable --workdir") from None
    return folder


def read_workdir_model(workdir: str | os.PathLike) -> tuple[Any, dict[str, Any]] | None:
    """The lowered forward function and its description from ``workdir/model/``, or ``None`` if absent.

    Raises:
        DataError: the files are damaged (the module's SHA-256 differs, or
            either cannot be read).
    """
    folder = pathlib.Path(workdir) / MODEL_DIR
    if not (folder / _MODEL_INFO).is_file():
        return None
    try:
        info = json.loads((folder / _MODEL_INFO).read_text(encoding="utf-8"))
        module = (folder / _MODEL_MODULE).read_bytes()
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{folder} is damaged ({type(exc).__name__}: {exc}); rerun the training to rewrite it") from None
    if hashlib.sha256(module).hexdigest() != info.get("module_sha256"):
        raise DataError(f"{folder / _MODEL_MODULE} is damaged (SHA-256 mismatch); rerun the training to rewrite it")
    try:
        exported = jax.export.deserialize(bytearray(module))
    except Exception as exc:
        raise DataError(f"{folder / _MODEL_MODULE} cannot be read ({type(exc).__name__}: {exc})") from None
    return exported, info


def _abstract_variables(variables: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Nested dicts of ``ShapeDtypeStruct`` shaped like the run's ``(params, model_state)``."""
    trees: dict[str, dict[str, Any]] = {"params": {}, "model_state": {}}
    for v in variables:
        dtype = _key_impl(v["dtype"])[1] if v["dtype"].startswith("key<") else jnp.dtype(v["dtype"])
        node = trees[v["part"]]
        *parents, last = v["path"]
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = jax.ShapeDtypeStruct(tuple(v["shape"]), dtype)
    return trees["params"], trees["model_state"]


# ---------------------------------------------------------------------------
# Load and run (jax + numpy only)
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExportedModel:
    """A reloaded ``model.jaxexport``: call it on a batch of raw inputs.

    Attributes:
        path: the file it was read from.
        info: the file's JSON description (``input_shape``, ``input_dtype``,
            ``output``, ``platforms``, ``metadata``...).
        exported: the deserialized ``jax.export.Exported``.
        weights: the weights, on the default device.
    """

    path: str
    info: dict[str, Any]
    exported: Any
    weights: tuple[jax.Array, ...]
    _call: Callable[..., jax.Array] = dataclasses.field(repr=False)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One example's shape, e.g. ``(28, 28, 1)``."""
        return tuple(self.info["input_shape"])

    @property
    def input_dtype(self) -> np.dtype:
        """``uint8`` for image models (raw pixels), ``float32`` otherwise."""
        return np.dtype(self.info["input_dtype"])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """The model's outputs ``(N, K)`` (logits, log-probabilities or values) for ``(N, *input_shape)`` inputs.

        Raises:
            DataError: inputs of the wrong shape or dtype (the message shows
                the expected ones and how to convert).
            ConfigError: the default device is not a platform it was exported for.
        """
        x = np.asarray(images)
        want = self.input_shape
        if x.ndim != len(want) + 1 or tuple(x.shape[1:]) != want or x.shape[0] < 1:
            raise DataError(
                f"{self.path} takes a batch of shape (N, {', '.join(map(str, want))}), got {x.shape}"
                + ("; add a batch axis with x[None]" if tuple(x.shape) == want else "")
            )
        if self.input_dtype == np.uint8:
            x = as_pixels(x, str(self.path))
        if self.input_dtype != np.uint8:
            x = x.astype(self.input_dtype)
        try:
            return np.asarray(self._call(list(self.weights), x))
        except ValueError as exc:  # e.g. run on a platform it was not exported for
            raise ConfigError(f"cannot run {self.path}: {str(exc).splitlines()[0]}") from None


def load_exported(path: str | os.PathLike) -> ExportedModel:
    """Reloads a ``model.jaxexport`` file; needs only jax and numpy.

    Counterpart of ``torch.jit.load(path)``. The returned model compiles once
    per batch size and runs on the default device (which must be one of the
    platforms it was exported for).

    Args:
        path: a file written from :func:`export_model`'s bytes (``jaxnet export``).

    Returns:
        An :class:`ExportedModel`; ``model(images)`` gives the outputs.

    Raises:
        DataError: a missing file, or one that is not a jaxnet export.

    Example:
        >>> model = load_exported("model.jaxexport")  # doctest: +SKIP
        >>> logits = model(np.zeros((7, 28, 28, 1), np.uint8))  # doctest: +SKIP
    """
    path = pathlib.Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read the exported model {path}: {exc.strerror or exc}") from None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            info = json.loads(archive["info"].tobytes().decode())
            module = archive["module"].tobytes()
            weights = [archive[f"w{i:04d}"] for i in range(len(info["weights"]))]
    except Exception as exc:  # zip, npz, JSON or key errors: all mean "not our file"
        raise DataError(
            f"{path} is not a jaxnet exported model ({type(exc).__name__}: {exc}); create one "
            "with 'jaxnet export --workdir W --out model.jaxexport'"
        ) from None
    if info.get("format") != EXPORT_FORMAT:
        raise DataError(f"{path} has export format {info.get('format')!r}; this jaxnet reads format {EXPORT_FORMAT}")
    try:
        exported = jax.export.deserialize(bytearray(module))
    except Exception as exc:
        raise DataError(f"{path}: the serialized module is damaged ({type(exc).__name__}: {exc})") from None
    device_weights = tuple(jax.device_put(w) for w in weights)
    return ExportedModel(str(path), info, exported, device_weights, jax.jit(exported.call))


def _to_batch(array: np.ndarray, shape: tuple[int, ...], name: str) -> tuple[np.ndarray, bool]:
    """One example or a batch, with the channel axis optional for 1-channel models."""
    gray = shape[-1] == 1
    if array.shape == shape or (gray and array.shape == shape[:-1]):
        return array.reshape((1, *shape)), False
    if array.ndim == len(shape) + 1 and array.shape[1:] == shape:
        return array, True
    if gray and array.ndim == len(shape) and array.shape[1:] == shape[:-1]:
        return array.reshape((-1, *shape)), True
    raise DataError(
        f"{name}: an array of shape {array.shape} is neither one example {shape} nor a batch "
        f"(N, {', '.join(map(str, shape))})"
    )


def read_inputs(file: str | os.PathLike, input_shape: Sequence[int]) -> tuple[np.ndarray, bool]:
    """Reads a ``.npy`` array (one example or a batch) or an image file as a batch.

    Images (PNG, JPEG, ... anything Pillow reads) are converted to the
    model's channels (grayscale ``L`` for 1, ``RGB`` for 3) and must already
    have its height and width.

    Args:
        file: the file.
        input_shape: one example's shape, e.g. ``(28, 28, 1)``.

    Returns:
        ``(batch, batched)``: an ``(N, *input_shape)`` array (uint8 for
        images), and whether the file held a batch rather than one example.

    Raises:
        DataError: unreadable files, wrong sizes or shapes.
    """
    path, shape = pathlib.Path(file), tuple(input_shape)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"{path}: not a readable .npy array ({exc})") from None
        return _to_batch(array, shape, str(path))
    from PIL import Image, UnidentifiedImageError  # only image files need Pillow

    modes = {1: "L", 3: "RGB"}
    if len(shape) != 3 or shape[-1] not in modes:
        raise DataError(f"{path}: image files fit (H, W, 1) or (H, W, 3) models, this one takes {shape}; pass a .npy array")
    try:
        with Image.open(path) as image:
            image = image.convert(modes[shape[-1]])
            array = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from None
    if array.shape[:2] != shape[:2]:
        raise DataError(
            f"{path}: the image is {array.shape[1]}x{array.shape[0]} pixels but the model takes "
            f"{shape[1]}x{shape[0]}; resize it first (e.g. Image.resize(({shape[1]}, {shape[0]})))"
        )
    return array.reshape((1, *shape)), False


def probabilities(outputs: np.ndarray, output: str) -> np.ndarray:
    """Class probabilities ``(N, K)`` from a classifier's outputs.

    Softmax of logits or log-probabilities (``softmax(log_softmax(z)) ==
    softmax(z)``); for ``"binary"`` (one logit per example) ``[1 - p, p]``
    with ``p = sigmoid(z)``, the counterpart of ``torch.sigmoid`` after
    ``BCEWithLogitsLoss``.

    >>> probabilities(np.zeros((1, 1)), "binary").tolist()
    [[0.5, 0.5]]
    """
    z = np.asarray(outputs, np.float64)
    if output == "binary":
        p = 1.0 / (1.0 + np.exp(-z.reshape(len(z), -1)[:, 0]))
        return np.stack([1.0 - p, p], axis=-1)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def as_pixels(x: np.ndarray, where: str) -> np.ndarray:
    """Inputs of a model that takes raw pixels, as uint8: integer pixel values 0..255 are taken as they are.

    Raises:
        DataError: floats (which scale they are in cannot be known), or integers outside 0..255.
    """
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.integer) or x.dtype == bool:
        lo, hi = (int(x.min()), int(x.max())) if x.size else (0, 0)
        if lo < 0 or hi > 255:
            raise DataError(f"{where}: holds {x.dtype} values in [{lo}, {hi}]; the model takes pixels 0..255")
        return x.astype(np.uint8)
    raise DataError(
        f"{where}: holds {x.dtype} values, the model takes raw pixels 0..255 (uint8); for images in [0, 1] "
        "save (x * 255).round().astype(np.uint8), for pixel values stored as floats x.round().astype(np.uint8)"
    )


def _read_batches(model: ExportedModel, files: Sequence[str | os.PathLike]) -> Iterator[tuple[list[str], np.ndarray]]:
    """``(names, outputs)`` per file: ``file`` for one example, ``file[i]`` for a batch's."""
    for file in files:
        batch, batched = read_inputs(file, model.input_shape)
        if model.input_dtype == np.uint8:
            batch = as_pixels(batch, str(file))
        names = [f"{file}[{i}]" for i in range(len(batch))] if batched else [str(file)]
        yield names, model(batch)


def predict_files(
    model: str | os.PathLike | ExportedModel, files: Sequence[str | os.PathLike]
) -> list[tuple[str, int, np.ndarray]]:
    """Classifies examples stored as ``.npy`` arrays or image files with an exported model.

    Args:
        model: a ``model.jaxexport`` path or a loaded :class:`ExportedModel`.
        files: ``.npy`` files (one example or a batch ``(N, ...)``: images,
            or feature vectors for a model of float inputs) and image files
            (PNG...). A batch file gives one result per example, named
            ``file[i]``.

    Returns:
        ``(name, predicted class, class probabilities)`` per example.

    Raises:
        ConfigError: the model predicts values, not classes (use :func:`predict_values`).
        DataError: unreadable or ill-shaped inputs (see :func:`read_inputs`).
    """
    if not isinstance(model, ExportedModel):
        model = load_exported(model)
    if model.info["output"] not in CLASSIFIER_OUTPUTS:
        raise ConfigError(f"{model.path} is a regression model, not a classifier; call load_exported(path)(x) "
                          "or predict_values for its values")
    results = []
    for names, outputs in _read_batches(model, files):
        for name, p in zip(names, probabilities(outputs, model.info["output"])):
            results.append((name, int(np.argmax(p)), p))
    return results


def predict_values(
    model: str | os.PathLike | ExportedModel, files: Sequence[str | os.PathLike]
) -> list[tuple[str, np.ndarray]]:
    """A regression model's outputs for the examples in ``.npy`` (or image) files.

    Returns:
        ``(name, values)`` per example, named as :func:`predict_files` names them.

    Raises:
        DataError: unreadable or ill-shaped inputs (see :func:`read_inputs`).
    """
    if not isinstance(model, ExportedModel):
        model = load_exported(model)
    return [(name, np.asarray(v).reshape(-1)) for names, outputs in _read_batches(model, files)
            for name, v in zip(names, outputs)]


# ---------------------------------------------------------------------------
# Command line: jaxnet export / jaxnet predict
# ---------------------------------------------------------------------------


def _step_arg(text: str) -> str | int:
    if text in ("best", "latest"):
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'best', 'latest' or a step number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a step number >= 0, got {value}")
    return value


def _platforms_arg(text: str) -> tuple[str, ...]:
    platforms = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in platforms if p not in PLATFORMS]
    if bad or not platforms:
        raise argparse.ArgumentTypeError(f"unknown platform(s) {bad or text!r}; choose from {', '.join(PLATFORMS)}")
    return platforms


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``jaxnet export`` and ``jaxnet predict`` to the ``jaxnet`` parser.

    Each subcommand's ``func`` prints its own output and returns ``None``.
    """
    p = subparsers.add_parser(
        "export",
        help="serialize a trained run's model for deployment (jax.export)",
        description="Restore a run's checkpoint and write its predict function, preprocessing "
                    "and weights included, as one file that runs without jaxnet's model code. Works "
                    "for any run, from jaxnet train or jaxnet.fit: the function recorded in W/model/, "
                    "else the model rebuilt from W/config.json.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--workdir", required=True, help="the run's --workdir (config.json and checkpoints/)")
    p.add_argument("--out", required=True, help="file to write, e.g. model.jaxexport")
    p.add_argument("--step", type=_step_arg, default="best",
                   help="checkpoint to export: best (by test accuracy, else latest), latest, or a step number")
    p.add_argument("--platforms", type=_platforms_arg, default=("cpu", "cuda"),
                   help="comma-separated platforms to lower for")
    p.set_defaults(func=run_export)
    q = subparsers.add_parser(
        "predict",
        help="classify .npy or PNG files with an exported model",
        description="Load a model.jaxexport (no model code needed) and print, per example, "
                    "the file, the predicted class and its probability (a regression model: its "
                    "values). .npy files hold images or, for a model of float inputs, feature rows.",
    )
    q.add_argument("--model", required=True, help="the exported model file")
    q.add_argument("files", nargs="+", help=".npy arrays (one example or a batch) or image files")
    q.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    q.set_defaults(func=run_predict)


@dataclasses.dataclass(frozen=True)
class _Source:
    """An export's function and what its weights are restored into."""

    exported: Any  # the lowered forward function (jax.export.Exported)
    names: tuple[str, ...]  # its weights, in argument order
    abstract: tuple[Any, Any]  # (params, model_state) shaped like the run's checkpoints
    input_shape: tuple[int, ...]
    input_dtype: str
    output: str
    how: str  # "recorded" (W/model) or "rebuilt" (from config.json)


def _recorded_source(recorded: tuple[Any, dict[str, Any]]) -> _Source:
    exported, info = recorded
    return _Source(exported, tuple(info["weights"]), _abstract_variables(info["variables"]),
                   tuple(info["input_shape"]), info["input_dtype"], info["output"], "recorded")


def _rebuilt_source(workdir: str | os.PathLike, config: Mapping[str, Any], platforms: Sequence[str]) -> _Source | None:
    """The model rebuilt as ``jaxnet train`` builds it, or ``None`` when the config names no code jaxnet can find."""
    from flax import nnx

    from jaxnet import models
    from jaxnet.checkpoint import workdir as workdir_lib
    from jaxnet.train import make_image_transform

    name = config.get("model")
    if not isinstance(name, str):
        return None
    by_class = {spec.cls.__name__: key for key, spec in models.MODELS.items()}  # jaxnet.fit records the class
    registered = name if name in models.MODELS else by_class.get(name)
    if registered is None and ":" not in name:
        return None
    spec = models.MODELS.get(registered)
    where = f"{workdir}/{workdir_lib.CONFIG_FILE}"
    output = config.get("output") or LOSSES.get(config.get("loss")) or (spec.output if spec else "logits")
    shape = tuple(config.get("input_shape") or (spec.input_shape if spec else ()))
    if not shape:
        raise ConfigError(f"{where} records no input_shape")
    dtype = config.get("input_dtype") or ("float32" if output in VALUE_OUTPUTS else "uint8")
    transform = None
    if dtype == "uint8":
        if not config.get("mean") or not config.get("std"):
            raise ConfigError(f"{where} lacks the input normalization ('mean' and 'std'); it was not written by jaxnet train")
        transform = make_image_transform(tuple(config["mean"]), tuple(config["std"]))
    model = models.build_model(registered or name, seed=int(config.get("seed", 0)), kwargs=config.get("model_kwargs"))
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    forward = make_forward(graphdef, params, model_state, transform=transform)
    exported = lower_forward(forward, input_shape=shape, input_dtype=dtype, platforms=platforms)
    return _Source(exported, forward.names, (params, model_state), shape, dtype, output, "rebuilt")


def _export_source(workdir: str | os.PathLike, config: Mapping[str, Any], platforms: Sequence[str]) -> _Source:
    """``W/model`` when it covers ``platforms`` (any model), else the model rebuilt from ``config.json``."""
    recorded = read_workdir_model(workdir)
    if recorded is not None and set(platforms) <= set(recorded[1]["platforms"]):
        return _recorded_source(recorded)
    name = config.get("model")
    try:
        rebuilt = _rebuilt_source(workdir, config, platforms)
        why = "it names no jaxnet model or package.module:factory"
    except ConfigError as exc:
        rebuilt, why = None, str(exc)
    if rebuilt is not None:
        return rebuilt
    if recorded is not None:
        have = ",".join(recorded[1]["platforms"])
        raise ConfigError(
            f"{workdir}/{MODEL_DIR} was lowered for {have}, and the model {name!r} cannot be rebuilt for "
            f"{','.join(platforms)} ({why}); export with --platforms {have}"
        )
    raise ConfigError(
        f"{workdir} has no {MODEL_DIR}/ folder (jaxnet.fit writes one at the start of a run), and its model "
        f"{name!r} cannot be rebuilt from {os.path.basename(_CONFIG_FILE)} ({why}); rerun the training with this "
        "jaxnet, or export from Python with jaxnet.export.export_model(result.graphdef, result.state, ...)"
    )


def _restore_weights(workdir: str | os.PathLike, config: Mapping[str, Any], step: str | int,
                     source: _Source) -> tuple[int, list[np.ndarray], str]:
    """``(step, weights in the source's order, params_sha256)`` of the chosen checkpoint."""
    from jaxnet import checkpoint
    from jaxnet.checkpoint import workdir as workdir_lib

    ckpt = checkpoint.create_checkpoint_manager(
        workdir_lib.checkpoint_directory(workdir), read_only=True,
        best_metric=config.get("best_metric", checkpoint.DEFAULT_BEST_METRIC),
        best_mode=config.get("best_mode", "max"),
    )
    try:
        if step == "best" and checkpoint.best(ckpt) is None:
            step = "latest"  # no epoch-end checkpoint ranked yet
        step = checkpoint.resolve_step(ckpt, step)
        params, model_state, _ = checkpoint.restore_variables(ckpt, *source.abstract, step=step)
    finally:
        checkpoint.close(ckpt)
    arrays = _named_arrays(params, model_state)
    missing = [n for n in source.names if n not in arrays]
    if missing:
        raise ConfigError(f"checkpoint step {step} of {workdir} lacks the weights {missing[:3]}; it belongs to another model")
    return step, [arrays[n] for n in source.names], checkpoint.params_sha256(params)


def run_export(args: argparse.Namespace) -> None:
    """``jaxnet export``: restores ``--step`` of ``--workdir`` and writes ``--out``.

    The function comes from ``W/model/`` (any model :func:`jaxnet.fit`
    trained, recorded by :func:`write_workdir_model`) when it was lowered
    for ``--platforms``; else the model is rebuilt from ``W/config.json``
    (a jaxnet model, or ``package.module:factory`` with its
    ``model_kwargs``), as ``jaxnet train`` built it.
    """
    from jaxnet.checkpoint import workdir

    config = workdir.read_config(args.workdir)
    source = _export_source(args.workdir, config, args.platforms)
    step, weights, sha256 = _restore_weights(args.workdir, config, args.step, source)
    name = config.get("model")
    metadata = {"model": name, "dataset": config.get("dataset"), "step": step, "params_sha256": sha256,
                "function": source.how}
    data = _pack(source.exported, weights, names=source.names, input_shape=source.input_shape,
                 input_dtype=source.input_dtype, output=source.output, metadata=metadata)
    out = pathlib.Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, out)
    except OSError as exc:
        raise ConfigError(f"cannot write --out {out}: {exc.strerror or exc}; choose a writable path") from None
    shape = ", ".join(map(str, source.input_shape))
    print(f"exported {name} (checkpoint step {step}) to {out}: {len(data)} bytes, platforms "
          f"{', '.join(source.exported.platforms)}, input {source.input_dtype} (N, {shape}), output {source.output}")


def run_predict(args: argparse.Namespace) -> None:
    """``jaxnet predict``: prints ``file<TAB>class<TAB>probability`` per example (or JSON).

    A regression model prints ``file<TAB>value[,value...]`` instead.
    """
    model = load_exported(args.model)
    if model.info["output"] not in CLASSIFIER_OUTPUTS:
        values = predict_values(model, args.files)
        if args.json:
            print(json.dumps({"model": str(args.model), "predictions": [
                {"file": name, "values": [float(x) for x in v]} for name, v in values]}))
            return
        for name, v in values:
            print(f"{name}\t{','.join(f'{float(x):.6g}' for x in v)}")
        return
    results = predict_files(model, args.files)
    if args.json:
        print(json.dumps({"model": str(args.model), "predictions": [
            {"file": name, "class": cls, "probability": float(p[cls]), "probabilities": [float(v) for v in p]}
            for name, cls, p in results
        ]}))
        return
    for name, cls, p in results:
        print(f"{name}\t{cls}\t{p[cls]:.4f}")
