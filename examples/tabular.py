"""A tabular classifier on in-memory numpy arrays: the breast-cancer data set, one logit, BCE.

No images, no data set registry, no normalization statistics: ``fit`` takes
``(x, y)`` numpy arrays as they are. The features are standardized with the
*training* rows' mean and std (numpy, before ``fit``), a Flax model written
as the Flax docs write one gives one logit per example, and ``fit`` infers
the binary loss (``BCEWithLogitsLoss``) from the integer 0/1 labels and the
one output. 20% of the training rows are held out for validation (seeded),
early stopping watches ``val_loss`` and restores the best epoch's weights,
and the held-out test rows are evaluated once, at the end.

The data is scikit-learn's copy of the Wisconsin diagnostic breast-cancer
set (569 rows, 30 features, shipped inside scikit-learn: no download;
``pip install scikit-learn``).

Command:  python examples/tabular.py
Measured (2-core Intel Xeon KVM guest, jax 0.10.2, 2026-12-03, seed 0):
early stopping after 18 of 50 epochs, **test accuracy 97.35%** (110 of the
113 held-out rows), ROC AUC 0.9961, 3.7-5.4 s of training.
"""

from __future__ import annotations

import argparse

import numpy as np
from flax import nnx

import jaxnet
from jaxnet.callbacks import EarlyStopping
from jaxnet.optim import create_optimizer


class TabularNet(nnx.Module):
    """Two hidden layers with LayerNorm and Dropout, one logit out."""

    def __init__(self, features: int, hidden: int = 64, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(features, hidden, rngs=rngs)
        self.norm1 = nnx.LayerNorm(hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.norm2 = nnx.LayerNorm(hidden, rngs=rngs)
        self.dropout = nnx.Dropout(0.2, rngs=rngs)
        self.out = nnx.Linear(hidden, 1, rngs=rngs)

    def __call__(self, x):
        x = self.dropout(nnx.gelu(self.norm1(self.fc1(x))))
        x = self.dropout(nnx.gelu(self.norm2(self.fc2(x))))
        return self.out(x)


def load(seed: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(train, test) arrays: 80/20 split, features standardized with the training rows' statistics."""
    try:
        from sklearn.datasets import load_breast_cancer
    except ImportError:
        raise SystemExit("this example reads scikit-learn's bundled data: pip install scikit-learn") from None
    x, y = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    test, train = order[: len(y) // 5], order[len(y) // 5 :]
    mean, std = x[train].mean(axis=0), x[train].std(axis=0) + 1e-8
    scale = lambda rows: ((x[rows] - mean) / std).astype(np.float32)  # noqa: E731
    return (scale(train), y[train].astype(np.int32)), (scale(test), y[test].astype(np.int32))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="metrics.jsonl, TensorBoard events, checkpoints")
    args = parser.parse_args(argv)

    (x_train, y_train), (x_test, y_test) = load(args.seed)
    model = TabularNet(x_train.shape[1], rngs=nnx.Rngs(args.seed))
    result = jaxnet.fit(
        model,
        {"train": (x_train, y_train), "test": (x_test, y_test)},
        create_optimizer("adamw", args.lr),
        epochs=args.epochs,
        batch_size=args.batch_size,
        validation_split=0.2,
        seed=args.seed,
        callbacks=[EarlyStopping("val_loss", patience=args.patience, restore_best=True)],
        workdir=args.workdir,
        progress=False,
    )
    s = result.summary
    probabilities = 1 / (1 + np.exp(-jaxnet.predict(model, x_test)[:, 0]))  # the model holds the best weights
    print(
        f"{s['epochs_run']} epochs ({'stopped early' if s['stopped_early'] else 'all'}), "
        f"{s['train_seconds']:.1f} s; validation loss {s['val_loss']:.4f}"
    )
    print(
        f"test accuracy: {100 * s['test_accuracy']:.2f}%  (ROC AUC {s['test_roc_auc']:.4f}; "
        f"{int(np.sum((probabilities > 0.5) == y_test))}/{len(y_test)} right)"
    )
    return s


if __name__ == "__main__":
    main()
