"""The one exception root for Layerbase's own errors.

Every error a user can cause (bad input, unreachable database, outdated schema) is a
``LayerbaseError`` whose message names the problem and the fix. The CLI turns it into a
one-line message and a non-zero exit code; ``--traceback`` shows the stack.
"""

from __future__ import annotations


class LayerbaseError(Exception):
    """Root of all errors Layerbase raises on purpose."""

    exit_code = 1


class ConfigError(LayerbaseError):
    """A setting (URL, directory, option combination) is invalid."""

    exit_code = 2


class DatabaseError(LayerbaseError):
    """The database cannot be reached or lacks something Layerbase needs."""

    exit_code = 3


class SchemaError(DatabaseError):
    """The database schema is missing or behind the code."""


class InputError(LayerbaseError):
    """A user-supplied input (dataset file, model, option value) is invalid."""

    exit_code = 2


class NotFoundError(InputError):
    """A named object (dataset, model, job) does not exist in the warehouse."""
