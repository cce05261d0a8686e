"""jaxnet: pure, jit-compiled training for people who learned deep learning in PyTorch.

The public API at a glance; each name lives in a small module of its own::

    from jaxnet import data, models, optim, fit
    dataset = data.load_dataset("mnist")
    model = models.create_model("mlp", seed=0)
    tx = optim.create_optimizer("adam", 1e-3)
    result = fit(model, dataset, tx, epochs=5, batch_size=64)
"""

__version__ = "0.1.0"

from jaxnet import data, losses, metrics, models, optim
from jaxnet.compilation import CompileCounter
from jaxnet.data import ArrayDataset, iterate_batches, load_dataset, prefetch_to_device
from jaxnet.errors import ConfigError, DataError, JaxnetError
from jaxnet.models import MODELS, create_model
from jaxnet.optim import create_optimizer, create_schedule
from jaxnet.state import TrainState, create_train_state, merge_model
from jaxnet.step import (
    loss_for_output,
    make_eval_step,
    make_predict_fn,
    make_scan_epoch,
    make_train_step,
    train_step_fn,
)
from jaxnet.train import FitResult, evaluate, fit, make_image_transform

__all__ = [
    "MODELS",
    "ArrayDataset",
    "CompileCounter",
    "ConfigError",
    "DataError",
    "FitResult",
    "JaxnetError",
    "TrainState",
    "create_model",
    "create_optimizer",
    "create_schedule",
    "create_train_state",
    "data",
    "evaluate",
    "fit",
    "iterate_batches",
    "load_dataset",
    "loss_for_output",
    "losses",
    "make_eval_step",
    "make_image_transform",
    "make_predict_fn",
    "make_scan_epoch",
    "make_train_step",
    "merge_model",
    "metrics",
    "models",
    "optim",
    "prefetch_to_device",
    "train_step_fn",
]
