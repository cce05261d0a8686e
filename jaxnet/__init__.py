"""jaxnet: pure, jit-compiled training for people who learned deep learning in PyTorch.

The public API at a glance; each name lives in a small module of its own::

    from jaxnet import data, models, optim, fit
    dataset = data.load_dataset("mnist")
    model = models.create_model("mlp", seed=0)
    tx = optim.create_optimizer("adam", 1e-3)
    result = fit(model, dataset, tx, epochs=5, batch_size=64)

Submodules are imported on first use (PEP 562), so that ``jaxnet.export``'s
loader runs without importing the models, flax or optax.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

# Re-exported (the ``as`` form marks them public: ``__all__`` below is computed).
from jaxnet.errors import ConfigError as ConfigError
from jaxnet.errors import DataError as DataError
from jaxnet.errors import JaxnetError as JaxnetError

__version__ = "0.1.0"

_SUBMODULES = ("callbacks", "checkpoint", "data", "export", "interop", "losses", "metrics", "models", "optim")
_EXPORTS = {  # name -> module that defines it
    "CompileCounter": "jaxnet.compilation",
    "ArrayDataset": "jaxnet.data",
    "iterate_batches": "jaxnet.data",
    "load_dataset": "jaxnet.data",
    "prefetch_to_device": "jaxnet.data",
    "MODELS": "jaxnet.models",
    "create_model": "jaxnet.models",
    "create_optimizer": "jaxnet.optim",
    "create_schedule": "jaxnet.schedules",
    "TrainState": "jaxnet.state",
    "copy_state": "jaxnet.state",
    "create_train_state": "jaxnet.state",
    "merge_model": "jaxnet.state",
    "predict": "jaxnet.inference",
    "loss_for_output": "jaxnet.step",
    "make_eval_step": "jaxnet.step",
    "make_predict_fn": "jaxnet.step",
    "make_scan_epoch": "jaxnet.step",
    "make_train_step": "jaxnet.step",
    "train_step_fn": "jaxnet.step",
    "StepFn": "jaxnet.step",
    "compile_step": "jaxnet.step",
    "FitResult": "jaxnet.train",
    "evaluate": "jaxnet.train",
    "fit": "jaxnet.train",
    "make_image_transform": "jaxnet.data.transforms",
}

__all__ = sorted(["ConfigError", "DataError", "JaxnetError", *_SUBMODULES, *_EXPORTS])


# Modules that moved into a subpackage keep their old import path: ``import
# jaxnet.sharding`` gives the very module object ``jaxnet.parallel.sharding``
# (so ``monkeypatch`` and ``isinstance`` agree across both names).
MOVED_MODULES = {
    "jaxnet.sharding": "jaxnet.parallel.sharding",
    "jaxnet.distributed_step": "jaxnet.parallel.steps",
    "jaxnet.distributed": "jaxnet.parallel.multiprocess",
    "jaxnet.launch": "jaxnet.parallel.launcher",
    "jaxnet.integrity": "jaxnet.checkpoint.integrity",
    "jaxnet.workdir": "jaxnet.checkpoint.workdir",
    "jaxnet.lock": "jaxnet.checkpoint.lock",
    "jaxnet.fit_plan": "jaxnet.training.plan",
    "jaxnet.run_files": "jaxnet.training.run_files",
    "jaxnet.stops": "jaxnet.training.stops",
    "jaxnet.evaluation": "jaxnet.training.evaluation",
    "jaxnet.runconfig": "jaxnet.cli.runconfig",
    "jaxnet.bench.cli": "jaxnet.cli.bench",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module path (:data:`MOVED_MODULES`) as the module it moved to."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> Any:
        return importlib.import_module(MOVED_MODULES[spec.name])

    def exec_module(self, module: Any) -> None:
        """Nothing to run: the module it moved to is already imported."""


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())


def __getattr__(name: str) -> Any:
    if f"jaxnet.{name}" in MOVED_MODULES:
        return importlib.import_module(MOVED_MODULES[f"jaxnet.{name}"])
    if name in _SUBMODULES:
        return importlib.import_module(f"jaxnet.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxnet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
