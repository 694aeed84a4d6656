"""huggingface_hub's exceptions, translated into messages that name the repo and say what to do.

Tokens never appear in these messages: they are built from the repo id, the revision and the HTTP status only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from huggingface_hub import constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hf_fusion.errors import FusionError


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level failures of whichever HTTP client huggingface_hub uses (httpx2 in 2.x, httpx before)."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):
        try:
            found.append(__import__(module).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


TRANSPORT_ERRORS = _transport_errors()


class HubError(FusionError):
    """A Hub request failed."""


class HubAccessError(HubError):
    """A repo, revision or file cannot be read: missing, private, gated, or the Hub is out of reach."""


class MissingTokenError(HubError):
    """An action needs a token and none was given, set or stored."""


class PushError(HubError):
    """Pushing the fused model failed or would overwrite files without ``overwrite``."""


def _status(err: HfHubHTTPError) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


@contextmanager
def hub_errors(repo_id: str, revision: str | None, action: str) -> Iterator[None]:
    """Re-raises Hub failures during ``action`` on ``repo_id`` as :class:`HubAccessError` with a clear message."""
    where = f"{repo_id}@{revision}" if revision else repo_id
    login = "pass --token, set HF_TOKEN, or run `hf auth login`"
    try:
        yield
    except HFValidationError:
        raise HubAccessError(f"{repo_id!r} is neither a local folder nor a valid Hub repo id (org/name).") from None
    except GatedRepoError:
        raise HubAccessError(
            f"{repo_id} is gated: accept its conditions on {constants.ENDPOINT}/{repo_id} with your account, then "
            f"{login}."
        ) from None
    except RevisionNotFoundError:
        raise HubAccessError(f"{repo_id} has no revision {revision!r} (a branch, tag or commit id).") from None
    except RepositoryNotFoundError:
        raise HubAccessError(
            f"{repo_id} was not found on {constants.ENDPOINT}: check the id, or if it is private, {login}."
        ) from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise HubAccessError(
            f"{where} is not in the local cache and the Hub cannot be used (HF_HUB_OFFLINE=1 or no connection). "
            "Download it once while online, or pass a local folder."
        ) from None
    except EntryNotFoundError as err:
        raise HubAccessError(
            f"{where}: a file is missing while trying to {action} ({err.__class__.__name__})."
        ) from None
    except HfHubHTTPError as err:
        status = _status(err)
        if status == 401:
            raise HubAccessError(f"cannot {action} {where}: the Hub refused the credentials (401); {login}.") from None
        if status == 403:
            raise HubAccessError(f"cannot {action} {where}: forbidden (403); the token lacks access.") from None
        raise HubAccessError(f"cannot {action} {where}: the Hub answered {status}.") from None
    except TRANSPORT_ERRORS as err:
        raise HubAccessError(
            f"cannot {action} {where}: {constants.ENDPOINT} did not answer ({err.__class__.__name__}) after retries. "
            "Rerun to resume (finished files stay in the cache), or set HF_HUB_OFFLINE=1 to use cached models."
        ) from None
