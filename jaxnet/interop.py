"""PyTorch weights in and out of jaxnet models (``state_dict`` <-> NNX parameters).

Keys are PyTorch's (``fc1.weight``, ``conv1.bias``, ``bn.running_mean``); the
jaxnet models use the tutorials' attribute names, so a key is the module path
plus PyTorch's parameter name. Layouts are converted on the way:

=================  ==========================  ===========================
layer              PyTorch                     jaxnet
=================  ==========================  ===========================
Linear weight      ``(out, in)``               ``kernel (in, out)``
Conv2d weight      ``(out, in, kh, kw)`` OIHW  ``kernel (kh, kw, in, out)`` HWIO
BatchNorm          ``weight``, ``bias``,       ``scale``, ``bias``,
                   ``running_mean/var``        ``mean``, ``var`` (BatchStat)
=================  ==========================  ===========================

The first Linear after a conv stack also has its input rows permuted:
PyTorch flattens NCHW feature maps in (C, H, W) order, jaxnet flattens NHWC
ones in (H, W, C) order. A model lists such layers and their PyTorch
``(C, H, W)`` shape in its ``torch_flatten_inputs`` class attribute.

torch is optional: it is imported only to read a file or to return tensors.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxnet.errors import ConfigError, DataError
from jaxnet.models.layers import BatchNorm1d, BatchNorm2d, Conv2d, Linear

__all__ = ["load_torch_state_dict", "to_torch_state_dict"]

_IGNORED_SUFFIX = "num_batches_tracked"  # PyTorch's BatchNorm step counter; unused with a float momentum


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One PyTorch tensor and the NNX variable that holds it."""

    variable: nnx.Variable
    torch_shape: tuple[int, ...]
    to_jax: Callable[[np.ndarray], np.ndarray]  # PyTorch layout -> jaxnet layout
    to_torch: Callable[[np.ndarray], np.ndarray]  # jaxnet layout -> PyTorch layout


def _same(a: np.ndarray) -> np.ndarray:
    return a


def _transpose(a: np.ndarray) -> np.ndarray:
    return a.T


def _linear_entries(layer: Linear, chw: tuple[int, int, int] | None, name: str) -> dict[str, _Entry]:
    n_in, n_out = layer.in_features, layer.out_features
    if chw is None:
        to_jax, to_torch = _transpose, _transpose
    else:
        c, h, w = chw
        if c * h * w != n_in:
            raise ConfigError(f"torch_flatten_inputs gives {name} the shape {chw}, but it has {n_in} inputs")
        # (out, C*H*W) -> (out, C, H, W) -> (H, W, C, out) -> (H*W*C, out), and back.
        to_jax = lambda a: a.reshape(n_out, c, h, w).transpose(2, 3, 1, 0).reshape(n_in, n_out)  # noqa: E731
        to_torch = lambda a: a.reshape(h, w, c, n_out).transpose(3, 2, 0, 1).reshape(n_out, n_in)  # noqa: E731
    entries = {"weight": _Entry(layer.kernel, (n_out, n_in), to_jax, to_torch)}
    if layer.bias is not None:
        entries["bias"] = _Entry(layer.bias, (n_out,), _same, _same)
    return entries


def _conv_entries(layer: Conv2d) -> dict[str, _Entry]:
    kh, kw = layer.kernel_size
    shape = (layer.out_channels, layer.in_channels, kh, kw)
    # OIHW <-> HWIO: both directions are the permutation (3, 2, 0, 1) / (2, 3, 1, 0).
    entries = {
        "weight": _Entry(layer.kernel, shape, lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1))
    }
    if layer.bias is not None:
        entries["bias"] = _Entry(layer.bias, (layer.out_channels,), _same, _same)
    return entries


def _batch_norm_entries(layer: BatchNorm1d | BatchNorm2d) -> dict[str, _Entry]:
    shape = (layer.num_features,)
    pairs = {"weight": layer.scale, "bias": layer.bias, "running_mean": layer.mean, "running_var": layer.var}
    return {key: _Entry(var, shape, _same, _same) for key, var in pairs.items()}


def _model_entries(model: nnx.Module) -> dict[str, _Entry]:
    """Maps every PyTorch ``state_dict`` key of ``model`` to its variable and layout."""
    flatten_inputs: Mapping[str, tuple[int, int, int]] = getattr(type(model), "torch_flatten_inputs", {})
    entries: dict[str, _Entry] = {}
    seen: set[str] = set()
    for path, module in nnx.iter_modules(model):
        prefix = ".".join(str(part) for part in path)
        if isinstance(module, Linear):
            seen.add(prefix)
            layer_entries = _linear_entries(module, flatten_inputs.get(prefix), prefix)
        elif isinstance(module, Conv2d):
            layer_entries = _conv_entries(module)
        elif isinstance(module, (BatchNorm1d, BatchNorm2d)):
            layer_entries = _batch_norm_entries(module)
        else:
            own = [k for k, v in vars(module).items() if isinstance(v, nnx.Variable)]
            if own:
                raise ConfigError(
                    f"{type(module).__name__} at {prefix or 'the root'} holds variables {own} that have no "
                    "known PyTorch layout; build models from jaxnet.models.layers"
                )
            continue
        entries.update({f"{prefix}.{k}" if prefix else k: e for k, e in layer_entries.items()})
    unknown = sorted(set(flatten_inputs) - seen)
    if unknown:
        raise ConfigError(f"{type(model).__name__}.torch_flatten_inputs names {unknown}, which are not Linear layers")
    return entries


def _to_numpy(value: Any, key: str) -> np.ndarray:
    """A PyTorch tensor, numpy array or JAX array as a numpy array."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if value.is_floating_point() and str(value.dtype) not in ("torch.float32", "torch.float64", "torch.float16"):
            value = value.float()  # bfloat16 has no numpy dtype
        return value.numpy()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"state_dict[{key!r}] is a {type(value).__name__}, not a tensor or array") from exc
    if not np.issubdtype(array.dtype, np.number):
        raise ConfigError(f"state_dict[{key!r}] has dtype {array.dtype}; expected a numeric tensor or array")
    return array


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise ImportError("this needs PyTorch; install it with `pip install 'jaxnet[torch]'` (torch==2.13.0)") from exc
    return torch


def _read_state_dict(source: Mapping[str, Any] | str | os.PathLike) -> Mapping[str, Any]:
    if isinstance(source, Mapping):
        state_dict = source
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no PyTorch state_dict file at {path!r}; save one with torch.save(model.state_dict(), path)"
            )
        torch = _import_torch()
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
            raise DataError(
                f"cannot read {path!r} as a PyTorch state_dict (loaded with weights_only=True): {exc}"
            ) from exc
        if not isinstance(state_dict, Mapping):
            raise DataError(f"{path!r} holds a {type(state_dict).__name__}, not a state_dict; save model.state_dict()")
    else:
        raise TypeError(
            f"expected a state_dict (a dict of tensors) or a .pt/.pth path, got {type(source).__name__}; "
            "for a torch module pass module.state_dict()"
        )
    nested = [k for k, v in state_dict.items() if isinstance(v, Mapping)]
    if nested:
        raise ConfigError(
            f"the state_dict has nested dicts under {nested}: it looks like a training checkpoint; "
            f"pass the model's part, e.g. checkpoint[{nested[0]!r}]"
        )
    return state_dict


def _strict_error(model: nnx.Module, missing: list[str], unexpected: list[str], mismatched: list[str]) -> ConfigError:
    """The counterpart of PyTorch's strict ``load_state_dict`` error: every problem at once."""
    lines = [f"Error(s) in loading state_dict for {type(model).__name__}:"]
    if missing:
        lines.append(f"  Missing key(s): {', '.join(missing)}")
    if unexpected:
        lines.append(f"  Unexpected key(s): {', '.join(unexpected)}")
        if all(k.startswith("module.") for k in unexpected) and missing:
            lines.append("  (keys start with 'module.': saved from DistributedDataParallel; strip that prefix)")
    lines.extend(f"  size mismatch for {m}" for m in mismatched)
    return ConfigError("\n".join(lines))


def load_torch_state_dict(model: nnx.Module, state_dict_or_path: Mapping[str, Any] | str | os.PathLike) -> None:
    """Copies PyTorch weights into ``model`` in place. Counterpart of ``module.load_state_dict(sd)`` (strict).

    Nothing is written unless every key and shape matches, so a failed load
    leaves the model as it was. ``num_batches_tracked`` entries are ignored.

    Args:
        model: a jaxnet model built from ``jaxnet.models.layers``.
        state_dict_or_path: a dict of torch tensors / numpy arrays keyed by
            PyTorch's names, or the path of a file written with
            ``torch.save(module.state_dict(), path)`` (read with
            ``weights_only=True``, never a plain pickle load).

    Raises:
        ConfigError: listing every missing key, unexpected key and shape mismatch.
        FileNotFoundError: if the path does not exist.
        DataError: if the file cannot be read as a state_dict.
        TypeError: if ``state_dict_or_path`` is neither a mapping nor a path.

    >>> import torch  # doctest: +SKIP
    >>> load_torch_state_dict(model, "mnist_mlp.pt")  # doctest: +SKIP
    """
    state_dict = _read_state_dict(state_dict_or_path)
    entries = _model_entries(model)
    given = {k: v for k, v in state_dict.items() if k.split(".")[-1] != _IGNORED_SUFFIX}
    arrays = {k: _to_numpy(v, k) for k, v in given.items() if k in entries}
    missing = [k for k in entries if k not in given]
    unexpected = [k for k in given if k not in entries]
    mismatched = [
        f"{k}: copying a param with shape {tuple(a.shape)}, the model expects {entries[k].torch_shape}"
        for k, a in arrays.items()
        if tuple(a.shape) != entries[k].torch_shape
    ]
    if missing or unexpected or mismatched:
        raise _strict_error(model, missing, unexpected, mismatched)
    for key, entry in entries.items():
        old = entry.variable[...]
        new = jnp.asarray(np.ascontiguousarray(entry.to_jax(arrays[key])), dtype=old.dtype)
        entry.variable[...] = jax.device_put(new, old.sharding)  # keep the old placement


def to_torch_state_dict(model: nnx.Module, *, as_tensors: bool = False) -> dict[str, Any]:
    """Exports ``model``'s weights with PyTorch's names and layouts. Counterpart of ``module.state_dict()``.

    The result loads into the matching PyTorch module with
    ``module.load_state_dict(sd)`` (strict); BatchNorm's ``num_batches_tracked``
    is left out, which PyTorch fills in.

    Args:
        model: a jaxnet model built from ``jaxnet.models.layers``.
        as_tensors: return ``torch.Tensor`` values (needs torch) instead of
            numpy arrays.

    Returns:
        A dict from PyTorch key (``"fc1.weight"``) to a contiguous array or tensor.

    Raises:
        ConfigError: if the model holds variables of a layer without a known layout.
        ImportError: if ``as_tensors`` and torch is not installed.

    >>> sorted(to_torch_state_dict(LinearRegression(rngs=nnx.Rngs(0))))  # doctest: +SKIP
    ['linear.bias', 'linear.weight']
    """
    torch = _import_torch() if as_tensors else None
    out: dict[str, Any] = {}
    for key, entry in _model_entries(model).items():
        array = np.ascontiguousarray(entry.to_torch(np.asarray(jax.device_get(entry.variable[...]))))
        out[key] = torch.from_numpy(array.copy()) if torch is not None else array
    return out
