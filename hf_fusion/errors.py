"""Exceptions raised by hf-fusion.

Every error a user can cause derives from :class:`FusionError`, carries a message that names the model, tensor or
parameter at fault, and is raised before any heavy work. The CLI prints the message and exits non-zero.
"""

from __future__ import annotations


class FusionError(Exception):
    """Base class of every error a user can act on."""


class RecipeError(FusionError, ValueError):
    """The recipe is malformed: a field is missing, has the wrong type, or contradicts another."""


class UnknownMethodError(RecipeError):
    """The method name is not in the registry."""


class ParameterError(RecipeError):
    """A method parameter is unknown, has the wrong type, or is out of range."""


class IncompatibleModelsError(FusionError):
    """The models cannot be fused: different architectures, tensor names, shapes or dtypes."""


class CheckpointError(FusionError):
    """A checkpoint cannot be read: missing, unreadable, truncated or malformed."""


class PickleCheckpointError(CheckpointError):
    """A checkpoint is a pickle (`.bin`/`.pt`) and the user did not opt in with ``allow_pickle``."""


class OutputExistsError(FusionError, FileExistsError):
    """The output folder already holds files and ``overwrite`` was not given."""


class InsufficientResourcesError(FusionError):
    """The merge would need more disk than is free."""


class JobStopped(FusionError):
    """The user stopped the job (the Space's Stop button); whatever it was writing has been discarded."""
