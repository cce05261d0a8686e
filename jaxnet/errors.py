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
