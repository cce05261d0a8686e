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
the linear regression, take ``float32``.)
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxnet.errors import ConfigError, DataError

EXPORT_FORMAT = 1
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
_OUTPUTS = ("logits", "log_probs", "regression")


# ---------------------------------------------------------------------------
# Export
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
        output: ``"logits"``, ``"log_probs"`` or ``"regression"``: what the
            model returns (decides how :func:`predict_files` reads it).
        platforms: lower for these platforms together.
        metadata: JSON-serializable facts stored in the file (model name,
            data set, step, ``params_sha256``...).

    Returns:
        The bytes of a ``model.jaxexport`` file.

    Raises:
        ConfigError: bad arguments, or a model that cannot take ``input_shape``.
    """
    from flax import nnx  # only exporting needs the model's framework

    shape = _check_export_args(input_shape, platforms, output)
    dtype = np.dtype(input_dtype or ("uint8" if transform is not None else "float32"))
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path((state.params, state.model_state))
    weights = [np.asarray(leaf) for _, leaf in leaves_with_paths]
    key = jax.random.PRNGKey(0)  # transforms ignore the key when train=False

    def predict(weights: list[jax.Array], images: jax.Array) -> jax.Array:  # images: (b, *shape)
        params, model_state = jax.tree.unflatten(treedef, weights)
        model = nnx.merge(graphdef, params, model_state)
        model.eval()  # model.eval(): dropout off, BatchNorm on running statistics
        return model(images if transform is None else transform(key, images, False))

    (batch,) = jax.export.symbolic_shape("b")
    specs = ([jax.ShapeDtypeStruct(w.shape, w.dtype) for w in weights],
             jax.ShapeDtypeStruct((batch, *shape), dtype))
    try:
        exported = jax.export.export(jax.jit(predict), platforms=tuple(platforms))(*specs)
    except Exception as exc:  # shape errors from inside the model's layers
        raise ConfigError(
            f"cannot export the model for inputs (b, {', '.join(map(str, shape))}) {dtype}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    out = exported.out_avals[0]
    info = {
        "format": EXPORT_FORMAT,
        "input_shape": list(shape),
        "input_dtype": dtype.name,
        "output": output,
        "num_outputs": int(out.shape[-1]) if len(out.shape) > 1 else 1,
        "platforms": list(exported.platforms),
        "jax_version": jax.__version__,
        "weights": [jax.tree_util.keystr(path) for path, _ in leaves_with_paths],
        "metadata": dict(metadata or {}),
    }
    try:
        info_bytes = json.dumps(info).encode()
    except TypeError as exc:
        raise ConfigError(f"export metadata must be JSON: {exc}") from None
    arrays = {"module": np.frombuffer(bytes(exported.serialize()), np.uint8),
              "info": np.frombuffer(info_bytes, np.uint8)}
    arrays.update({f"w{i:04d}": w for i, w in enumerate(weights)})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


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
        if self.input_dtype == np.uint8 and x.dtype != np.uint8:
            raise DataError(
                f"{self.path} takes raw uint8 pixels (0..255), got {x.dtype}; convert images in "
                "[0, 1] with (x * 255).round().astype(np.uint8)"
            )
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


def _softmax(outputs: np.ndarray) -> np.ndarray:
    # Also right for log-probabilities: softmax(log_softmax(z)) == softmax(z).
    z = outputs.astype(np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def predict_files(
    model: str | os.PathLike | ExportedModel, files: Sequence[str | os.PathLike]
) -> list[tuple[str, int, np.ndarray]]:
    """Classifies images stored as ``.npy`` arrays or image files with an exported model.

    Args:
        model: a ``model.jaxexport`` path or a loaded :class:`ExportedModel`.
        files: ``.npy`` files (one example or a batch ``(N, ...)``) and image
            files (PNG...). A batch file gives one result per example, named
            ``file[i]``.

    Returns:
        ``(name, predicted class, class probabilities)`` per example.

    Raises:
        ConfigError: the model is a regression model.
        DataError: unreadable or ill-shaped inputs (see :func:`read_inputs`).
    """
    if not isinstance(model, ExportedModel):
        model = load_exported(model)
    if model.info["output"] == "regression":
        raise ConfigError(f"{model.path} is a regression model, not a classifier; call load_exported(path)(x) for its values")
    results = []
    for file in files:
        batch, batched = read_inputs(file, model.input_shape)
        if model.input_dtype == np.uint8 and batch.dtype != np.uint8:
            raise DataError(
                f"{file}: holds {batch.dtype} values, the model takes raw uint8 pixels (0..255); "
                "save (x * 255).round().astype(np.uint8) for images in [0, 1]"
            )
        probs = _softmax(model(batch))
        for i, p in enumerate(probs):
            name = f"{file}[{i}]" if batched else str(file)
            results.append((name, int(np.argmax(p)), p))
    return results


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
                    "and weights included, as one file that runs without jaxnet's model code.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
                    "the file, the predicted class and its probability.",
    )
    q.add_argument("--model", required=True, help="the exported model file")
    q.add_argument("files", nargs="+", help=".npy arrays (one example or a batch) or image files")
    q.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    q.set_defaults(func=run_predict)


def run_export(args: argparse.Namespace) -> None:
    """``jaxnet export``: restores ``--step`` of ``--workdir`` and writes ``--out``."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxnet import checkpoint, workdir
    from jaxnet.models import MODELS, create_model
    from jaxnet.state import TrainState
    from jaxnet.train import make_image_transform

    config = workdir.read_config(args.workdir)
    name = config.get("model")
    if name not in MODELS:
        raise ConfigError(f"{args.workdir}/{workdir.CONFIG_FILE} names the model {name!r}, which jaxnet does not know; expected one of {sorted(MODELS)}")
    spec = MODELS[name]
    transform = None
    if spec.output != "regression":
        if "mean" not in config or "std" not in config:
            raise ConfigError(f"{args.workdir}/{workdir.CONFIG_FILE} lacks the input normalization ('mean' and 'std'); it was not written by jaxnet train")
        transform = make_image_transform(tuple(config["mean"]), tuple(config["std"]))
    graphdef, params, model_state = nnx.split(create_model(name, seed=0), nnx.Param, ...)
    ckpt = checkpoint.create_checkpoint_manager(
        workdir.checkpoint_directory(args.workdir), read_only=True,
        best_metric=config.get("best_metric", checkpoint.DEFAULT_BEST_METRIC),
        best_mode=config.get("best_mode", "max"),
    )
    try:
        step = args.step
        if step == "best" and checkpoint.best(ckpt) is None:
            step = "latest"  # no epoch-end checkpoint ranked yet
        step = checkpoint.resolve_step(ckpt, step)
        params, model_state, _ = checkpoint.restore_variables(ckpt, params, model_state, step=step)
    finally:
        checkpoint.close(ckpt)
    state = TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=(),
                       model_state=model_state, rng=jax.random.PRNGKey(0))
    metadata = {"model": name, "dataset": config.get("dataset"), "step": step,
                "params_sha256": checkpoint.params_sha256(params)}
    data = export_model(graphdef, state, input_shape=spec.input_shape, transform=transform,
                        output=spec.output, platforms=args.platforms, metadata=metadata)
    out = pathlib.Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, out)
    except OSError as exc:
        raise ConfigError(f"cannot write --out {out}: {exc.strerror or exc}; choose a writable path") from None
    shape = ", ".join(map(str, spec.input_shape))
    print(f"exported {name} (checkpoint step {step}) to {out}: {len(data)} bytes, platforms "
          f"{', '.join(args.platforms)}, input {'uint8' if transform else 'float32'} (N, {shape})")


def run_predict(args: argparse.Namespace) -> None:
    """``jaxnet predict``: prints ``file<TAB>class<TAB>probability`` per example (or JSON)."""
    results = predict_files(args.model, args.files)
    if args.json:
        print(json.dumps({"model": str(args.model), "predictions": [
            {"file": name, "class": cls, "probability": float(p[cls]), "probabilities": [float(v) for v in p]}
            for name, cls, p in results
        ]}))
        return
    for name, cls, p in results:
        print(f"{name}\t{cls}\t{p[cls]:.4f}")
