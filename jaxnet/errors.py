"""The library's own error types.

Every problem that a user can cause -- a bad file, a bad name, a bad value --
is raised as one of these, with a message that names the problem and the fix.
They subclass ``ValueError`` so that ``except ValueError`` keeps working for
callers that do not know about jaxnet.
"""

from __future__ import annotations


class JaxnetError(ValueError):
    """Base class of every error jaxnet raises on purpose."""


class DataError(JaxnetError):
    """A data file or data set is missing, malformed, truncated or unsafe.

    The message names the file (or URL) and what is wrong with it.
    """


class ConfigError(JaxnetError):
    """An unknown name or an invalid value was given (model, optimizer, flag)."""


class TrainingDiverged(JaxnetError):
    """The loss or the training state became NaN or infinite, and the run stopped.

    Attributes:
        step: the first optimizer step whose loss (or resulting state) was not finite.
        loss: that loss (``nan``/``inf``), or ``None`` when only the state was.
        last_finite_checkpoint: the newest checkpoint step of the run (every
            checkpoint jaxnet writes is finite), or ``None``.
    """

    def __init__(self, step: int, loss: float | None, last_finite_checkpoint: int | None):
        self.step, self.loss, self.last_finite_checkpoint = step, loss, last_finite_checkpoint
        what = f"loss {loss}" if loss is not None else "the parameters or optimizer state are not finite"
        where = (
            f"last finite checkpoint: step {last_finite_checkpoint}"
            if last_finite_checkpoint is not None
            else "no checkpoint was written"
        )
        super().__init__(f"training diverged at step {step} ({what}); {where}")


class Interrupted(KeyboardInterrupt):
    """``fit`` stopped on SIGTERM or SIGINT, after finishing its step and saving a checkpoint.

    A ``KeyboardInterrupt``, so that code which cleans up on Ctrl-C keeps
    working. ``exit_status`` is the signal's conventional one (128 + number:
    143 for SIGTERM, 130 for SIGINT).
    """

    def __init__(self, signal_name: str, signum: int, step: int, checkpoint_step: int | None):
        self.signal_name, self.signum, self.step = signal_name, signum, step
        self.checkpoint_step, self.exit_status = checkpoint_step, 128 + signum
        if checkpoint_step is not None:
            tail = "checkpoint saved; continue with --resume"
        else:
            tail = "nothing saved (no --workdir)"
        super().__init__(f"stopped by {signal_name} at step {step}; {tail}")
