"""Per-model CLIP scores of rendered pictures against their prompts, through the bundled ``clip_score`` module.

The CLIP model is checked before anything is rendered (a folder must hold one; offline, a Hub id must be in the
cache), so a long rendering never ends in a model that cannot load.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hf_fusion.errors import RecipeError
from hf_fusion.metrics import MetricError, load_metric
from hf_fusion.recipe import ModelRef

if TYPE_CHECKING:
    from PIL.Image import Image

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"


def check_clip_model(name: str) -> None:
    """Refuses a CLIP model that cannot be read: a folder without ``config.json``, or (offline) an uncached id."""
    ref = ModelRef.parse(name)
    if ref.is_local:
        folder = Path(ref.path).expanduser()
        if not (folder / "config.json").is_file():
            raise RecipeError(
                f"CLIP model folder {folder} has no config.json; pass a folder saved by CLIPModel.save_pretrained "
                "(with its processor), a Hub id, or --no-clip-score."
            )
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.is_offline_mode() and not isinstance(try_to_load_from_cache(name, "config.json"), str):
        raise RecipeError(
            f"CLIP model {name!r} is not in the local cache and HF_HUB_OFFLINE is set; download it once while "
            "online, pass a local folder, or pass --no-clip-score."
        )


def clip_scores(
    images: Sequence[Sequence[Image]],
    labels: Sequence[str],
    prompts: Sequence[str],
    *,
    clip_model: str = DEFAULT_CLIP_MODEL,
    device: str = "cpu",
) -> dict[str, float]:
    """The mean CLIP score of each model's pictures (``images[model][row]``, row ``i`` drawn from ``prompts[i]``),
    in one pass so the CLIP model loads once."""
    if any(len(column) != len(prompts) for column in images):
        raise ValueError("every model needs one picture per prompt row.")
    metric, _ = load_metric("clip_score", "bundled")
    try:
        result = metric.compute(
            predictions=[picture for column in images for picture in column],
            references=[prompt for _ in images for prompt in prompts],
            model_name_or_path=clip_model,
            device=device,
        )
    except OSError as err:
        if err.errno is not None:
            raise
        raise MetricError(str(err)) from None
    per_pair = result["clip_scores"]
    rows = len(prompts)
    return {label: sum(per_pair[i * rows : (i + 1) * rows]) / rows for i, label in enumerate(labels)}
