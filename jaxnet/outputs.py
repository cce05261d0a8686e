"""The kinds of model output jaxnet trains, evaluates and exports: one list, used everywhere.

A model's output kind says how its outputs are read: as class scores
(``logits``, ``log_probs``, ``binary``: integer labels, accuracy reported)
or as predicted values (``regression``, ``l1``, ``huber``: float targets).
It picks the loss (:data:`LOSS_OF_OUTPUT`), the metrics and how
``jaxnet predict`` prints a prediction. This module imports nothing, so that
the light ``jaxnet.export`` loader can use it.

>>> OUTPUT_KINDS
('logits', 'log_probs', 'binary', 'regression', 'l1', 'huber')
>>> LOSSES["cross_entropy"], LOSS_OF_OUTPUT["log_probs"]
('logits', 'nll')
"""

from __future__ import annotations

CLASSIFIER_KINDS = ("logits", "log_probs", "binary")  # read as class scores: integer labels, accuracy
VALUE_KINDS = ("regression", "l1", "huber")  # read as predicted values: float targets
OUTPUT_KINDS = (*CLASSIFIER_KINDS, *VALUE_KINDS)

# The losses by name (``fit(loss_fn=NAME)``, ``jaxnet train --loss NAME``) and
# the output kind each one trains.
LOSSES: dict[str, str] = {
    "cross_entropy": "logits",  # CrossEntropyLoss on logits
    "nll": "log_probs",  # NLLLoss on log-probabilities (a model ending in log_softmax)
    "binary": "binary",  # BCEWithLogitsLoss on one logit per example, integer labels 0/1
    "mse": "regression",  # MSELoss on values
    "l1": "l1",  # L1Loss on values
    "huber": "huber",  # HuberLoss (delta 1) on values
}
LOSS_OF_OUTPUT: dict[str, str] = {output: loss for loss, output in LOSSES.items()}
