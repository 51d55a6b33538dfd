"""Exceptions raised by icelora for bad input; the CLI turns them into one line and exit status 2."""

from __future__ import annotations


class IceloraError(Exception):
    """Base class of every error icelora reports to a user as a single line."""


class InvalidRequestError(IceloraError, ValueError):
    """An edit request has an empty, missing or unencodable field."""


class InvalidConfigError(IceloraError, ValueError):
    """A configuration value is out of range or names something unknown."""


class ModelLoadError(IceloraError, OSError):
    """A model could not be found, downloaded or understood."""


class AdapterFolderError(IceloraError, OSError):
    """A folder given to save or load an edit is not an icelora adapter folder."""
