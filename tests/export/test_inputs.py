"""Inputs of an exported model: color PNGs, and each kind of bad input file named in one line."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from jaxnet.errors import DataError
from jaxnet.export import predict_files, read_inputs


def test_color_png_for_a_color_model(artifacts, tmp_path):
    _, result = artifacts
    image = result["cifar_cnn"]["images"][0]
    Image.fromarray(image, mode="RGB").save(tmp_path / "c.png")
    batch, batched = read_inputs(tmp_path / "c.png", (32, 32, 3))
    assert not batched
    np.testing.assert_array_equal(batch[0], image)  # PNG is lossless
    ((_, cls, _),) = predict_files(result["cifar_cnn"]["path"], [tmp_path / "c.png"])
    assert cls == int(np.argmax(result["cifar_cnn"]["live"][1][0]))


def test_bad_input_files(artifacts, tmp_path):
    _, result = artifacts
    path = result["mlp"]["path"]
    Image.fromarray(np.zeros((32, 32), np.uint8), mode="L").save(tmp_path / "big.png")
    np.save(tmp_path / "float.npy", np.zeros((28, 28), np.float32))
    np.save(tmp_path / "shape.npy", np.zeros((3, 30, 30), np.uint8))
    (tmp_path / "text.png").write_text("not an image")
    cases = {
        "big.png": r"32x32 pixels but the model takes 28x28; resize",
        "float.npy": r"float32 values, the model takes raw pixels 0..255 \(uint8\)",
        "shape.npy": r"shape \(3, 30, 30\) is neither one example \(28, 28, 1\) nor a batch",
        "text.png": r"not a readable image",
        "absent.npy": r"no such file",
    }
    for name, message in cases.items():
        with pytest.raises(DataError, match=message):
            predict_files(path, [tmp_path / name])
