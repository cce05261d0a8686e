"""Your own model on real data: a residual CNN written with plain ``flax.nnx`` layers on CIFAR-10.

Nothing here is a jaxnet layer: the model is written as the Flax docs write
one (``nnx.Conv``, ``nnx.BatchNorm``, ``nnx.Dropout(rate, rngs=rngs)``
holding its own random stream, ``__call__(self, x)``). jaxnet trains it as
it trains its own models, with what a real project needs:

- a seeded validation split held out of the 50,000 training images
  (``validation_split``); every epoch reports ``val_*`` and the test split
  is evaluated once, at the end;
- early stopping on ``val_accuracy``, restoring the best epoch's weights;
- checkpoints in ``--workdir``, the best kept by ``val_accuracy``
  (``jaxnet export --workdir W --step best`` exports it);
- bf16 compute (``precision="bf16"``) with float32 parameters, applied to
  the Flax layers too;
- random crop + flip on the device, the learning rate logged each epoch.

Command:  python examples/your_model.py --data-dir ../shared/data --workdir runs/your_model
Measured (2-core Intel Xeon KVM guest, no GPU, jax 0.10.2, flax 0.12.8,
2026-12-03, real CIFAR-10, seed 0, other jobs sharing the cores, load 3.4):
validation accuracy 73.24% and **test accuracy 72.58%** after the 10 epochs
(early stopping did not trigger), 1152 s including compilation (92-139 s per
epoch). ``jaxnet export --workdir runs/your_model --step best`` exported the
best-by-validation checkpoint (step 3510), which ``jaxnet predict`` ran at
71.6% on the first 500 test images.
"""

from __future__ import annotations

import argparse

from flax import nnx

import jaxnet
from jaxnet.callbacks import EarlyStopping, LearningRateLogger
from jaxnet.data import load_dataset
from jaxnet.optim import create_optimizer, create_schedule


class ResidualBlock(nnx.Module):
    """conv-BN-ReLU-conv-BN plus a (projected) shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=stride, padding=1, use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)  # PyTorch's 0.1 update rate
        self.conv2 = nnx.Conv(cout, cout, (3, 3), padding=1, use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
        if stride != 1 or cin != cout:
            self.shortcut = nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=False, rngs=rngs)
        else:
            self.shortcut = None

    def __call__(self, x):
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return nnx.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nnx.Module):
    """A small ResNet: a stem, three stages (width, 2x, 4x; stride 2 between), pooling, dropout, a head."""

    def __init__(self, num_classes: int = 10, width: int = 16, *, rngs: nnx.Rngs):
        self.stem = nnx.Conv(3, width, (3, 3), padding=1, use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)
        self.blocks = nnx.List(
            [
                ResidualBlock(width, width, 1, rngs=rngs),
                ResidualBlock(width, 2 * width, 2, rngs=rngs),
                ResidualBlock(2 * width, 4 * width, 2, rngs=rngs),
            ]
        )
        self.dropout = nnx.Dropout(0.2, rngs=rngs)
        self.head = nnx.Linear(4 * width, num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return self.head(self.dropout(x.mean(axis=(1, 2))))


def main(argv: list[str] | None = None, *, data=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="folder holding cifar10/ (the python archive)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW, cosine decay)")
    parser.add_argument("--width", type=int, default=16, help="channels of the first stage")
    parser.add_argument("--val-split", type=float, default=0.1)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="metrics.jsonl, TensorBoard events, checkpoints")
    args = parser.parse_args(argv)

    data = data if data is not None else load_dataset("cifar10", data_dir=args.data_dir, download=False)
    model = ResNet(data.num_classes, args.width, rngs=nnx.Rngs(args.seed))
    steps_per_epoch = int(data.num_train * (1 - args.val_split)) // args.batch_size
    schedule = create_schedule("cosine", args.lr, steps_per_epoch=steps_per_epoch, epochs=args.epochs)
    result = jaxnet.fit(
        model,
        data,
        create_optimizer("adamw", schedule, weight_decay=5e-4),
        epochs=args.epochs,
        batch_size=args.batch_size,
        validation_split=args.val_split,
        seed=args.seed,
        augment=True,
        precision=args.precision,
        workdir=args.workdir,
        callbacks=[EarlyStopping("val_accuracy", patience=args.patience, restore_best=True), LearningRateLogger()],
    )
    s = result.summary
    print(
        f"{s['epochs_run']} of {s['epochs']} epochs in {s['train_seconds']:.0f} s "
        f"({'stopped early' if s['stopped_early'] else 'all run'}), precision {s['precision']}"
    )
    print(f"validation accuracy {100 * s['val_accuracy']:.2f}% (best epoch's weights)")
    print(f"test accuracy: {100 * s['test_accuracy']:.2f}%")
    return s


if __name__ == "__main__":
    main()
