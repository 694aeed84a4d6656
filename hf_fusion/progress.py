"""Progress bars that behave like huggingface_hub's: off with ``HF_HUB_DISABLE_PROGRESS_BARS=1`` or ``--quiet``."""

from __future__ import annotations

from typing import Any

from huggingface_hub.utils import tqdm as _hub_tqdm


def progress_bar(*, total: int, desc: str, unit: str, disable: bool = False, **kwargs: Any) -> Any:
    """A tqdm bar named under ``hf_fusion`` so huggingface_hub's per-group switches apply to it too."""
    return _hub_tqdm(total=total, desc=desc, unit=unit, disable=disable or None, name="hf_fusion", **kwargs)
