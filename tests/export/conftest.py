"""The exported models the loading and input tests share, made once for the package."""

from __future__ import annotations

import numpy as np
import pytest

from jaxnet.data.transforms import make_image_transform
from jaxnet.export import export_model
from jaxnet.step import make_predict_fn
from tests.export.helpers import MNIST_MEAN, MNIST_STD, random_images, trained_state


@pytest.fixture(scope="package")
def artifacts(tmp_path_factory):
    """Exported mlp (dropout, MNIST) and cifar_cnn (3 channels), with live outputs for 1, 7, 64 images."""
    folder = tmp_path_factory.mktemp("export")
    result = {}
    for name, mean, std in (("mlp", MNIST_MEAN, MNIST_STD), ("cifar_cnn", (0.5,) * 3, (0.5,) * 3)):
        spec, graphdef, state = trained_state(name)
        transform = make_image_transform(mean, std)
        path = folder / f"{name}.jaxexport"
        path.write_bytes(
            export_model(
                graphdef,
                state,
                input_shape=spec.input_shape,
                transform=transform,
                output=spec.output,
                metadata={"model": name},
            )
        )
        batch = random_images(spec.input_shape)
        np.save(folder / f"{name}_images.npy", batch)
        live = make_predict_fn(graphdef, transform=transform)
        result[name] = {
            "path": path,
            "images": batch,
            "live": {n: np.asarray(live(state, batch[:n])) for n in (1, 7, 64)},
        }
    return folder, result
