"""Exceptions raised by hf-fusion.

Every error a user can cause derives from :class:`FusionError`, carries a message that names the model, tensor or
parameter at fault, and is raised before any heavy work. The CLI prints the message and exits non-zero.
"""

from __future__ import annotations

import errno


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


class NonFiniteError(FusionError, ValueError):
    """An input tensor holds NaN or infinite values, or a fused tensor does not fit its output dtype."""


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


class FileSystemError(FusionError):
    """The file system refused a read or a write: no space left, no permission, a path too long, a file in the
    way. Whatever the run was writing has been removed."""


_OS_ADVICE = {
    errno.ENOSPC: "no space left on the device; free some space or write the output elsewhere",
    errno.EDQUOT: "the disk quota is exceeded; free some space or write the output elsewhere",
    errno.EACCES: "permission denied; choose a folder you can write to, or change its permissions",
    errno.EPERM: "the operation is not permitted (a read-only or immutable folder?); choose another folder",
    errno.EROFS: "the file system is read-only; choose a folder on a writable one",
    errno.ENAMETOOLONG: "a file name is too long for the file system; choose a shorter path or name",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EEXIST: "something is already in the way at that path; choose another path",
}


def describe_os_error(err: OSError) -> str:
    """An OS error in words a user can act on: what happened, where, and what to do."""
    advice = _OS_ADVICE.get(err.errno or -1, err.strerror or str(err))
    where = err.filename if err.filename is not None else ""
    if isinstance(where, bytes):
        where = where.decode(errors="replace")
    where = str(where)
    if len(where) > 200:
        where = where[:100] + "..." + where[-60:]
    return f"{advice}" + (f" ({where})" if where else "") + "."
