"""The two exceptions of :mod:`jaxnet.checkpoint`: damage (fall back to an older step) and mismatch (never)."""

from __future__ import annotations

from jaxnet.errors import JaxnetError


class CheckpointError(JaxnetError):
    """A checkpoint is missing, unreadable, damaged or cannot be written.

    The message names the step and, where one is to blame, the file.
    """


class CheckpointMismatchError(CheckpointError):
    """A sound checkpoint does not fit the state it is restored into.

    Raised when the arrays differ in number, shape or dtype, e.g. a different
    model or optimizer; never a reason to fall back to an older step.
    """
