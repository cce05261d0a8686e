"""What ``fit`` accepts as data, turned into one shape: train, validation and test splits.

Keras's ``fit(x, y, validation_split=...)`` and Lightning's DataModules take
many forms of data; :func:`as_fit_data` takes the everyday ones:

- an :class:`~jaxnet.data.dataset.ArrayDataset` (what ``load_dataset`` returns);
- an ``(x, y)`` tuple of arrays (training data only);
- a dict: ``{"x": ..., "y": ...}`` (or ``"image"``/``"label"``), or splits
  ``{"train": (x, y), "validation": (x, y), "test": (x, y)}`` (each split a
  tuple or such a dict; ``"val"`` also names the validation split);
- a random-access source of records (``len()`` and ``source[i]`` giving a
  dict with ``"image"``/``"label"`` or ``"x"``/``"y"``, or an ``(x, y)``
  pair): a ``tfds.data_source(...)`` split, a ``grain.MapDataset``, a
  ``torch.utils.data.Dataset``; examples are read when a batch needs them;
- an iterable of batches (a list, a ``DataLoader``, a ``grain`` loader, or a
  function returning a fresh iterator each epoch), each batch an ``(x, y)``
  pair or a dict as above.

Inputs are used as they are, with one exception: ``uint8`` inputs are taken to
be pixels and scaled by 1/255 (``ToTensor``), and normalized with ``mean`` and
``std`` when the data carries them (an ``ArrayDataset``). Tabular features
and token ids need no statistics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from jaxnet.data.dataset import ArrayDataset
from jaxnet.errors import ConfigError, DataError

_SPLIT_NAMES = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}
_INPUT_KEYS = ("x", "image", "inputs")
_LABEL_KEYS = ("y", "label", "labels", "targets")
FORMS = (
    "an ArrayDataset, an (x, y) tuple, a dict {'x': ..., 'y': ...}, a dict of splits "
    "{'train': (x, y), 'validation': (x, y), 'test': (x, y)}, a random-access source of records, "
    "or an iterable of (x, y) batches"
)


@dataclasses.dataclass(frozen=True)
class Split:
    """One split held as arrays (or array-likes indexed by an integer array)."""

    x: Any  # (N, ...) inputs
    y: np.ndarray  # (N,) labels or targets, or (N, k) targets

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx: np.ndarray) -> Split:
        """The rows ``idx`` of this split (a copy for numpy arrays, a view for lazy sources)."""
        x = self.x[idx] if isinstance(self.x, np.ndarray) else _Rows(self.x, idx)
        return Split(x, self.y[idx])


@dataclasses.dataclass(frozen=True)
class BatchStream:
    """Training data given as batches: iterated again at every epoch."""

    make_iterator: Callable[[], Iterator[Any]]
    description: str


@dataclasses.dataclass(frozen=True)
class FitData:
    """Data as :func:`jaxnet.fit` uses it.

    Attributes:
        name: what the data is called in logs and the workdir's config.
        source: where it came from (files, "in-memory arrays", ...).
        train: the training split, or a :class:`BatchStream`.
        validation: the split evaluated after every epoch and used to choose
            the best checkpoint, or ``None``.
        test: the split evaluated at the end (and, when there is no
            validation split, after every epoch, as the tutorials do), or ``None``.
        num_classes: classes of integer labels (``None``: infer from the model).
        mean, std: per-channel pixel statistics for ``uint8`` inputs, or ``None``.
    """

    name: str
    source: str
    train: Split | BatchStream
    validation: Split | None
    test: Split | None
    num_classes: int | None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if (self.mean is None) != (self.std is None):  # Normalize needs both; one alone is a mistake
            raise ConfigError(f"{self.name}: give the pixel statistics mean and std together, or neither")

    @property
    def streamed(self) -> bool:
        return isinstance(self.train, BatchStream)

    @property
    def train_split(self) -> Split:
        """The training split as arrays, for code that runs only on arrays (``scan=True``, a dataset check).

        Raises:
            TypeError: the training data is streamed as batches, with no arrays to index.
        """
        if isinstance(self.train, BatchStream):
            raise TypeError(f"the training data of {self.name} is streamed as batches ({self.train.description})")
        return self.train

    def splits(self) -> dict[str, Split]:
        """The splits held as arrays, by name."""
        named = {"train": self.train, "validation": self.validation, "test": self.test}
        return {k: v for k, v in named.items() if isinstance(v, Split)}


class _Rows:
    """Rows ``idx`` of a lazily read array-like, read only when indexed."""

    def __init__(self, base: Any, idx: np.ndarray):
        self._base, self._idx = base, np.asarray(idx)
        self.shape = (len(self._idx), *tuple(getattr(base, "shape", (0,))[1:]))
        self.dtype = getattr(base, "dtype", None)

    def __len__(self) -> int:
        return len(self._idx)

    def __getitem__(self, index: Any) -> np.ndarray:
        return self._base[self._idx[index]]


class _RecordColumn:
    """One field of a random-access source of records, as an array-like ``(N, ...)``."""

    def __init__(self, source: Any, field: str | int):
        self._source, self._field = source, field
        first = np.asarray(_field_of(source[0], field))
        self.shape = (len(source), *first.shape)
        self.dtype = first.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            return np.asarray(_field_of(self._source[int(index)], self._field), self.dtype)
        keys = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index)
        return np.stack(
            [np.asarray(_field_of(self._source[int(i)], self._field), self.dtype) for i in keys.reshape(-1)]
        ).reshape(*keys.shape, *self.shape[1:])


def _field_of(record: Any, field: str | int) -> Any:
    return record[field]


def _record_fields(record: Any, what: str) -> tuple[str | int, str | int]:
    """Which fields of a record hold the input and the label."""
    if isinstance(record, (tuple, list)) and len(record) == 2:
        return 0, 1
    if isinstance(record, Mapping):
        x = next((k for k in _INPUT_KEYS if k in record), None)
        y = next((k for k in _LABEL_KEYS if k in record), None)
        if x is not None and y is not None:
            return x, y
        raise DataError(
            f"{what}: records have the keys {sorted(map(str, record))}; expected an input key "
            f"({', '.join(_INPUT_KEYS)}) and a label key ({', '.join(_LABEL_KEYS)})"
        )
    raise DataError(f"{what}: a record is a {type(record).__name__}; expected a dict or an (x, y) pair")


def _is_source(obj: Any) -> bool:
    """A random-access source of records: ``len()`` and ``obj[i]``, and not an array."""
    return (
        hasattr(obj, "__len__")
        and hasattr(obj, "__getitem__")
        and not hasattr(obj, "shape")
        and not isinstance(obj, (str, bytes, Mapping, tuple, list))
    )


def _labels(y: Any, what: str) -> np.ndarray:
    labels = np.asarray(y)
    if labels.ndim == 0:
        raise DataError(f"{what}: labels must be an array with one row per example; got a scalar")
    if labels.dtype == object or not (np.issubdtype(labels.dtype, np.number) or labels.dtype == bool):
        raise DataError(f"{what}: labels must be numbers; got dtype {labels.dtype}")
    if labels.dtype == bool or np.issubdtype(labels.dtype, np.integer):
        return labels.astype(np.int32)
    return labels.astype(np.float32)


def _inputs(x: Any, what: str) -> Any:
    if (
        not isinstance(x, (np.ndarray, list, tuple))
        and hasattr(x, "shape")
        and hasattr(x, "__getitem__")
        and not hasattr(x, "__array__")
    ):
        return x  # a lazily read array-like (a tfds/grain column): indexed batch by batch
    array = np.asarray(x)
    if array.dtype == object or array.ndim == 0:
        raise DataError(
            f"{what}: inputs must be a numeric array with one row per example; "
            f"got {'a scalar' if array.ndim == 0 else 'ragged or non-numeric data'}"
        )
    if np.issubdtype(array.dtype, np.floating) and array.dtype != np.float32:
        array = array.astype(np.float32)  # float64 from pandas/numpy: JAX computes in float32
    return array


def _split(obj: Any, what: str) -> Split:
    """An ``(x, y)`` pair, a dict with input and label keys, or a source of records."""
    if isinstance(obj, Split):
        return obj
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        x, y = _inputs(obj[0], what), _labels(obj[1], what)
    elif isinstance(obj, Mapping):
        fx, fy = _record_fields(obj, what)
        x, y = _inputs(obj[fx], what), _labels(obj[fy], what)
    elif _is_source(obj):
        if len(obj) == 0:
            raise DataError(f"{what} is empty")
        fx, fy = _record_fields(obj[0], what)
        x = _RecordColumn(obj, fx)
        y = _labels([_field_of(obj[i], fy) for i in range(len(obj))], what)
    else:
        raise ConfigError(f"{what}: cannot use a {type(obj).__name__} as data; pass {FORMS}")
    if len(x) != len(y):
        raise DataError(f"{what}: {len(x)} inputs but {len(y)} labels; they must have the same length")
    if len(y) == 0:
        raise DataError(f"{what} is empty")
    return Split(x, y)


def _stream(obj: Any) -> BatchStream:
    if callable(obj) and not hasattr(obj, "__iter__"):
        return BatchStream(lambda: iter(obj()), f"batches from {getattr(obj, '__name__', 'a function')}()")
    if iter(obj) is obj:
        once = {"used": False}

        def make() -> Iterator[Any]:
            if once["used"]:
                raise ConfigError(
                    "the training data is a one-shot iterator, already used up by the first epoch; "
                    "pass a re-iterable (a list, a DataLoader) or a function returning a fresh iterator"
                )
            once["used"] = True
            return obj

        return BatchStream(make, f"batches from a {type(obj).__name__}")
    return BatchStream(lambda: iter(obj), f"batches from a {type(obj).__name__}")


def batch_arrays(batch: Any) -> dict[str, Any]:
    """A streamed batch (``(x, y)`` or a dict) as jaxnet's ``{"image", "label"}`` batch."""
    if isinstance(batch, Mapping) and "image" in batch and "label" in batch:
        return {
            "image": batch["image"],
            "label": batch["label"],
            **({"mask": batch["mask"]} if "mask" in batch else {}),
        }
    fx, fy = _record_fields(batch, "a training batch")
    return {"image": np.asarray(batch[fx]), "label": np.asarray(batch[fy])}


def _from_mapping(data: Mapping[str, Any]) -> dict[str, Split]:
    split_keys = [k for k in data if k in _SPLIT_NAMES]
    if not split_keys:
        return {"train": _split(data, "the training data")}
    unknown = sorted(set(map(str, data)) - set(_SPLIT_NAMES))
    if unknown:
        raise ConfigError(
            f"data has the keys {unknown} beside splits; a dict of splits may hold only "
            f"{', '.join(sorted(_SPLIT_NAMES))}"
        )
    if "train" not in data:
        raise ConfigError(f"data has the splits {sorted(data)} but no 'train' split to train on")
    return {_SPLIT_NAMES[k]: _split(v, f"the {_SPLIT_NAMES[k]} split") for k, v in data.items()}


def _num_classes(splits: Mapping[str, Split]) -> int | None:
    """Classes of integer labels: ``max + 1`` over the splits (``None`` for float targets)."""
    labels = [s.y for s in splits.values()]
    if not labels or not all(np.issubdtype(y.dtype, np.integer) and y.ndim == 1 for y in labels):
        return None
    lo = min(int(y.min()) for y in labels)
    if lo < 0:
        raise DataError(f"class labels must be integers >= 0; found {lo}")
    return max(int(y.max()) for y in labels) + 1


def holdout(train: Split, fraction: float, *, seed: int) -> tuple[Split, Split]:
    """A seeded random holdout: ``(train, validation)`` with ``round(fraction * N)`` validation rows.

    Counterpart of Keras's ``validation_split`` (which takes the *last* rows)
    with a shuffle first, as ``torch.utils.data.random_split`` does; the
    same ``seed`` always holds out the same rows.

    Raises:
        ConfigError: ``fraction`` outside ``(0, 1)``, or a split that would be empty.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise ConfigError(f"validation_split must be a fraction in (0, 1), e.g. 0.1; got {fraction!r}")
    n = len(train)
    k = int(round(fraction * n))
    if k < 1 or k >= n:
        raise ConfigError(
            f"validation_split {fraction} of {n} training examples leaves {k} for validation and "
            f"{n - k} for training; both need at least one example"
        )
    order = np.random.default_rng(np.random.SeedSequence([seed, 0x7A11])).permutation(n)
    return train.take(np.sort(order[k:])), train.take(np.sort(order[:k]))


def as_fit_data(
    data: Any,
    *,
    validation_split: float | None = None,
    validation_data: Any = None,
    seed: int = 0,
) -> FitData:
    """Turns any data form ``fit`` takes (see the module docstring) into :class:`FitData`.

    Args:
        data: the data.
        validation_split: hold out this fraction of the training split
            (seeded by ``seed``) for validation.
        validation_data: a validation split given apart (any split form).
        seed: the run's seed.

    Raises:
        ConfigError: an unusable form, or two sources of validation data.
        DataError: mismatched lengths, empty splits, non-numeric labels.
    """
    if isinstance(data, FitData):  # already turned (e.g. by the CLI, which checked it first)
        if validation_split is not None or validation_data is not None:
            raise ConfigError(
                "the data already is FitData, with its validation split decided; "
                "pass validation_split/validation_data to as_fit_data instead"
            )
        return data
    mean = std = None
    if isinstance(data, ArrayDataset):
        splits = {"train": Split(data.train_images, np.asarray(data.train_labels))}
        if data.num_test:
            splits["test"] = Split(data.test_images, np.asarray(data.test_labels))
        for name, split in splits.items():
            if len(split) == 0:
                raise DataError(f"{data.name}: the {name} split is empty ({data.source})")
        name, source, num_classes = data.name, data.source, (data.num_classes or None)
        if data.num_classes:  # image classification: ToTensor + Normalize with the set's statistics
            mean, std = tuple(data.mean), tuple(data.std)
        stream = None
    elif isinstance(data, Mapping):
        splits, stream = _from_mapping(data), None
        name, source, num_classes = "arrays", "in-memory arrays", None
    elif isinstance(data, tuple):
        if len(data) != 2:
            raise ConfigError(f"data is a tuple of {len(data)} items; pass (x, y), or {FORMS}")
        splits, stream = {"train": _split(data, "the training data")}, None
        name, source, num_classes = "arrays", "in-memory arrays", None
    elif _is_source(data):
        splits, stream = {"train": _split(data, "the training data")}, None
        name, source, num_classes = type(data).__name__, f"records from a {type(data).__name__}", None
    elif hasattr(data, "shape") or isinstance(data, (str, bytes)):
        raise ConfigError(f"data is a single {type(data).__name__}, with no labels; pass (x, y), or {FORMS}")
    elif isinstance(data, Iterable) or callable(data):
        splits, stream = {}, _stream(data)
        name, source, num_classes = "batches", stream.description, None
    else:
        raise ConfigError(f"cannot train on a {type(data).__name__}; pass {FORMS}")

    if validation_data is not None:
        if validation_split is not None or "validation" in splits:
            raise ConfigError(
                "give the validation data once: validation_split=, validation_data= "
                "or a 'validation' split in data, not several"
            )
        splits["validation"] = _split(validation_data, "validation_data")
    if validation_split is not None:
        if stream is not None:
            raise ConfigError(
                "validation_split needs the training data as arrays; with an iterable "
                "of batches pass validation_data=(x, y)"
            )
        if "validation" in splits:
            raise ConfigError("data already has a 'validation' split; drop validation_split")
        splits["train"], splits["validation"] = holdout(splits["train"], validation_split, seed=seed)
    if num_classes is None:
        num_classes = _num_classes(splits)
    return FitData(
        name=name,
        source=source,
        train=stream if stream is not None else splits["train"],
        validation=splits.get("validation"),
        test=splits.get("test"),
        num_classes=num_classes,
        mean=mean,
        std=std,
    )
