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
records the forward function without its weights in ``W/model/``
(:func:`write_workdir_model`), and :func:`export_workdir` (``jaxnet export
--workdir W``) restores a checkpoint's arrays into it.

The package, one concern a module: :mod:`~jaxnet.export.lowering` (the
forward function, lowered; the file's bytes), :mod:`~jaxnet.export.workdir`
(a run's ``W/model/`` and exporting from a workdir),
:mod:`~jaxnet.export.loading` (reloading and predicting, jax and numpy only)
and :mod:`~jaxnet.export.inputs` (reading ``.npy``/image inputs). The
``jaxnet export`` and ``jaxnet predict`` commands are :mod:`jaxnet.cli.export`.
"""

from __future__ import annotations

import importlib
from typing import Any

from jaxnet.export.inputs import as_pixels, probabilities, read_inputs
from jaxnet.export.loading import ExportedModel, load_exported, predict_files, predict_values
from jaxnet.export.lowering import EXPORT_FORMAT, PLATFORMS, Forward, export_model, lower_forward, make_forward
from jaxnet.export.workdir import MODEL_DIR, export_workdir, read_workdir_model, write_workdir_model

__all__ = [
    "EXPORT_FORMAT",
    "MODEL_DIR",
    "PLATFORMS",
    "ExportedModel",
    "Forward",
    "as_pixels",
    "export_model",
    "export_workdir",
    "load_exported",
    "lower_forward",
    "make_forward",
    "predict_files",
    "predict_values",
    "probabilities",
    "read_inputs",
    "read_workdir_model",
    "write_workdir_model",
]

# The commands, which lived here before the CLI became a package: imported
# on first use, so that loading a model never imports the command line.
_CLI_NAMES = ("register_cli", "run_export", "run_predict")


def __getattr__(name: str) -> Any:
    if name in _CLI_NAMES:
        return getattr(importlib.import_module("jaxnet.cli.export"), name)
    raise AttributeError(f"module 'jaxnet.export' has no attribute {name!r}")
