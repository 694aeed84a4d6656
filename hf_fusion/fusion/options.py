"""How a fusion runs, beside what its recipe says it fuses."""

from __future__ import annotations

from dataclasses import dataclass

from hf_fusion.engine.writer import DEFAULT_MAX_SHARD_BYTES


@dataclass(frozen=True)
class FusionOptions:
    """The run's settings, passed as one object through every step instead of keyword by keyword."""

    overwrite: bool = False
    """Replace an existing, non-empty output folder (atomically: the old one goes only once the new one is in place)."""
    allow_pickle: bool = False
    """Read ``.bin``/``.pt`` checkpoints (with ``weights_only``)."""
    show_progress: bool = True
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    budget_elements: int | None = None
    """Elements the streaming engine reads per slice across all inputs (memory stays flat in model size); None
    picks the device's default (:func:`hf_fusion.engine.stream.default_budget_elements`)."""
    token: str | None = None
    """The Hugging Face token, already resolved (never logged)."""
    mixed_precision: str = "no"
    """Autocast dtype of test-time adaptation's forward passes (``no``, ``fp16``, ``bf16``)."""
    convert_single_files: bool = True
    """Convert single-file diffusion checkpoints to diffusers layout (the one step that holds a whole model in
    memory); a shared server turns it off."""
