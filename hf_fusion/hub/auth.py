"""Tokens: from ``--token``, then ``HF_TOKEN``, then the stored login; never printed, logged or written."""

from __future__ import annotations

from huggingface_hub import get_token

from hf_fusion.hub.errors import MissingTokenError


def resolve_token(token: str | None) -> str | None:
    """The explicit token, else what huggingface_hub finds (``HF_TOKEN``, then ``hf auth login``)."""
    return token or get_token()


def require_token(token: str | None, action: str) -> str:
    resolved = resolve_token(token)
    if not resolved:
        raise MissingTokenError(
            f"{action} needs a Hugging Face token with write access: pass --token, set HF_TOKEN, "
            "or run `hf auth login`."
        )
    return resolved
