"""Builds the embedded MNIST sample shipped in ``jaxnet/data/sample``.

Usage (from the repository root):

    python tools/make_sample.py --src ../shared/data/mnist --out jaxnet/data/sample

Writes the first 6,000 train and the first 1,000 test images of the official
MNIST files, with their labels, as IDX ``.gz`` files under the official names,
plus a README.txt with the attribution. The gzip output is deterministic
(no timestamp, no file name), so rerunning it gives identical bytes.
"""

from __future__ import annotations

import argparse
import gzip
import pathlib
import sys

import numpy as np

from jaxnet.data import mnist

NUM_TRAIN = 6000
NUM_TEST = 1000
MIN_CLASS_SHARE = 0.8  # each class gets at least 80% of an even share

README = """\
Embedded MNIST sample
=====================

The first {train} training and the first {test} test images of the MNIST
database of handwritten digits, with their labels, in the official IDX format
(gzip-compressed, official file names). jaxnet falls back to this sample when
the full data set cannot be downloaded, so that examples and tests run offline.

Images per class (0-9):
  train: {train_counts}
  test:  {test_counts}

Source: the MNIST database, Yann LeCun, Corinna Cortes and Christopher J.C.
Burges, http://yann.lecun.com/exdb/mnist/ . MNIST is made available under the
Creative Commons Attribution-Share Alike 3.0 license (CC BY-SA 3.0); this
subset is redistributed under the same license.

Built by tools/make_sample.py from the official files.
"""


def write_idx_gz(path: pathlib.Path, array: np.ndarray) -> None:
    """Writes a uint8 array as a gzip IDX file (magic 00 00 08 NDIM, big-endian dims)."""
    header = bytes([0, 0, mnist.IDX_UBYTE, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def class_counts(labels: np.ndarray) -> list[int]:
    return np.bincount(labels, minlength=mnist.NUM_CLASSES).tolist()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=pathlib.Path, required=True, help="folder with the official MNIST files")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="output folder (jaxnet/data/sample)")
    args = parser.parse_args(argv)

    full = mnist.read_mnist(args.src)
    args.out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, count, images, labels in (
        ("train", NUM_TRAIN, full.train_images, full.train_labels),
        ("test", NUM_TEST, full.test_images, full.test_labels),
    ):
        images_stem, labels_stem = mnist.MNIST_FILES[split]
        images, labels = images[:count, :, :, 0], labels[:count]
        counts[split] = class_counts(labels)
        floor = MIN_CLASS_SHARE * count / mnist.NUM_CLASSES
        if min(counts[split]) < floor:
            print(f"{split}: class counts {counts[split]} are too unbalanced", file=sys.stderr)
            return 1
        write_idx_gz(args.out / f"{images_stem}.gz", images)
        write_idx_gz(args.out / f"{labels_stem}.gz", labels.astype(np.uint8))
    (args.out / "README.txt").write_text(
        README.format(train=NUM_TRAIN, test=NUM_TEST, train_counts=counts["train"], test_counts=counts["test"])
    )
    total = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"wrote {args.out}: train {counts['train']}, test {counts['test']}, {total:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
