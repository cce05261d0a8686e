"""CIFAR-10 with the tutorial CNN (conv16-pool-conv32-pool-fc128-fc10).

The tutorial's recipe: Normalize((0.5,)*3, (0.5,)*3), SGD(lr=0.001,
momentum=0.9), CrossEntropyLoss, batch 100, 10 epochs. The network is the
tutorial's exactly: it has no activation functions (so it is a linear
classifier with pooling), and its ``32*7*7`` fc1 input is fixed to ``32*8*8``,
which 32x32 inputs give after two 2x2 poolings. ``--augment`` adds the
torchvision random-crop + flip recipe, done on the device.

Command:  python examples/cifar10_cnn.py --data-dir ../shared/data
Measured (2-core x86-64 CPU, jax 0.10.2, 2026-11-27, real CIFAR-10, seed 0,
measured with ``jaxnet train --model cifar_cnn``, which runs this recipe): 58.03% test accuracy
after 10 epochs in 138 s, with other jobs sharing the CPU (PyTorch running
the tutorial's code: 57.8%).
"""

from __future__ import annotations

import argparse

from jaxnet import fit
from jaxnet.data import load_dataset
from jaxnet.models import create_model
from jaxnet.optim import create_optimizer


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="folder holding cifar10/ (the python archive)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--augment", action="store_true", help="random crop (padding 4) + horizontal flip")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="metrics.jsonl, TensorBoard events, curves.png")
    args = parser.parse_args(argv)

    # --- Data: CIFAR10 + ToTensor + Normalize((0.5,)*3, (0.5,)*3), on the device --------------
    data = load_dataset("cifar10", data_dir=args.data_dir, download=False)
    print(f"data: {data.source}")

    # --- Model and optimizer: CNN() and optim.SGD(lr=0.001, momentum=0.9) ---------------------
    model = create_model("cifar_cnn", seed=args.seed)
    tx = create_optimizer("sgd", 1e-3, momentum=0.9)

    # --- Train and evaluate every epoch --------------------------------------------------------
    result = fit(
        model,
        data,
        tx,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        augment=args.augment,
        workdir=args.workdir,
    )
    s = result.summary
    print(
        f"measured: test accuracy {100 * s['test_accuracy']:.2f}% after {s['epochs']} epochs "
        f"in {s['train_seconds']:.1f} s (compilation included)"
    )
    return s


if __name__ == "__main__":
    main()
