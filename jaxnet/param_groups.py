"""Parameter groups: PyTorch's per-group learning rates and weight decay, as ``optax.multi_transform``.

PyTorch passes an optimizer a list of ``param_groups``, each with its own
``lr`` and ``weight_decay``, and freezes a tensor with
``requires_grad = False``. jaxnet labels every parameter leaf by its path
(:func:`label_params`, first matching pattern wins) and builds one
``torch.optim.SGD``-exact transform per label (:func:`make_group_sgd`),
``optax.set_to_zero()`` for frozen labels; a group may also stop at a given
step (its learning rate is 0 from then on, so its parameters stay exactly
where they were, whatever its momentum buffer holds), which is airbench's
``whiten.bias.requires_grad = epoch < 3``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxnet.errors import ConfigError
from jaxnet.optim import create_optimizer

__all__ = ["FROZEN", "SGDGroup", "label_params", "leaf_paths", "make_group_sgd"]

FROZEN = None  # the group setting of labels that are never updated (optax.set_to_zero())


@dataclasses.dataclass(frozen=True)
class SGDGroup:
    """One PyTorch ``param_group`` of ``torch.optim.SGD``."""

    lr: float  # the group's peak learning rate (torch's group["lr"]), times the shared schedule
    weight_decay: float = 0.0  # torch's coupled decay: grad += weight_decay * param, before momentum
    stop_step: int | None = None  # updates from this (0-based) step on have lr 0: frozen; None: never


def _key_name(key: Any) -> str | None:
    """A path entry's name: dict keys and sequence indices; ``None`` for a Variable's ``.value``."""
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return None if key.name == "value" else key.name
    return str(key)


def leaf_paths(params: Any) -> Any:
    """The tree of ``params`` with each leaf replaced by its dotted path, e.g. ``"groups.0.norm1.bias"``.

    For an ``nnx.State`` the names are the model's attribute names, the
    PyTorch ``state_dict`` key without its last part renamed.

    >>> leaf_paths({"conv": {"kernel": 0}, "head": [1]})
    {'conv': {'kernel': 'conv.kernel'}, 'head': ['head.0']}
    """

    def name(path: tuple[Any, ...], _: Any) -> str:
        return ".".join(part for part in map(_key_name, path) if part is not None)

    return jax.tree_util.tree_map_with_path(name, params)


def label_params(params: Any, rules: Sequence[tuple[str, str]], default: str = "default") -> Any:
    """Labels each leaf by the first rule whose pattern fully matches its dotted path.

    Args:
        params: a pytree of parameters (an ``nnx.State``, a dict, ...).
        rules: ``(regex, label)`` pairs, tried in order against the path from
            :func:`leaf_paths` with ``re.fullmatch``.
        default: the label of leaves no rule matches.

    Returns:
        A tree like ``params`` with string labels as leaves, for
        ``optax.multi_transform`` (or :func:`make_group_sgd`).

    Raises:
        ConfigError: for a pattern that is not a valid regular expression.

    >>> label_params({"norm": {"bias": 0, "scale": 0}, "w": 0}, [(r"norm\\.scale", "frozen"), (r"norm.*", "bias")])
    {'norm': {'bias': 'bias', 'scale': 'frozen'}, 'w': 'default'}
    """
    try:
        compiled = [(re.compile(pattern), label) for pattern, label in rules]
    except re.error as exc:
        raise ConfigError(f"param group rule {exc.pattern!r} is not a valid regular expression: {exc}") from None

    def label(path: str) -> str:
        return next((lab for pattern, lab in compiled if pattern.fullmatch(path)), default)

    return jax.tree.map(label, leaf_paths(params))


def _group_schedule(group: SGDGroup, schedule: Callable[[jax.Array], jax.Array] | None) -> optax.Schedule:
    def lr(count: jax.Array) -> jax.Array:
        value = group.lr * (jnp.ones((), jnp.float32) if schedule is None else schedule(count))
        if group.stop_step is not None:
            value = jnp.where(count < group.stop_step, value, 0.0)
        return value

    return lr


def make_group_sgd(
    labels: Any,
    groups: Mapping[str, SGDGroup | None],
    *,
    momentum: float = 0.0,
    nesterov: bool = False,
    schedule: Callable[[jax.Array], jax.Array] | None = None,
) -> optax.GradientTransformation:
    """``torch.optim.SGD(param_groups, momentum=..., nesterov=...)`` with a ``LambdaLR`` schedule, in optax.

    Each group's update is :func:`jaxnet.optim.create_optimizer`'s SGD:
    ``g += weight_decay * p``; ``buf = momentum * buf + g``; ``p -= lr_t *
    (g + momentum * buf)`` (Nesterov) or ``lr_t * buf``, with ``lr_t =
    group.lr * schedule(t)`` at the ``t``-th update (0-based, as ``LambdaLR``
    counts) and 0 from ``group.stop_step`` on.

    Args:
        labels: a tree of labels like the parameters (from :func:`label_params`).
        groups: label -> :class:`SGDGroup`, or :data:`FROZEN` (``None``) for
            parameters that never change (``requires_grad = False``).
        momentum: shared momentum of every group.
        nesterov: Nesterov momentum.
        schedule: ``t -> factor`` multiplying every group's lr (``LambdaLR``'s lambda); ``None``: 1.

    Returns:
        The ``optax.multi_transform``; its ``init`` needs ``params`` of ``labels``' structure.

    Raises:
        ConfigError: for labels without a group (they are named), or an invalid group setting.
    """
    missing = sorted(set(jax.tree.leaves(labels)) - set(groups))
    if missing:
        raise ConfigError(
            f"parameters labelled {missing} have no group; give each label an SGDGroup "
            f"(or FROZEN), e.g. groups={{{missing[0]!r}: SGDGroup(lr=0.1)}}"
        )
    transforms = {}
    for name, group in groups.items():
        if group is FROZEN:
            transforms[name] = optax.set_to_zero()
        else:
            transforms[name] = create_optimizer(
                "sgd",
                _group_schedule(group, schedule),
                momentum=momentum,
                nesterov=nesterov,
                weight_decay=group.weight_decay,
            )
    return optax.multi_transform(transforms, labels)
