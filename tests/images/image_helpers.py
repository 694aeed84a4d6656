"""Independent computations the picture comparison is held against: plain diffusers rendering, a tiny random CLIP
model, and the CLIP score from ``get_image_features`` / ``get_text_features``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusion_models import tiny_tokenizer
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

CLIP_SEED = 2  # a random CLIP whose cosines on the pool's pictures are partly positive, partly negative
SIZE = 32


def build_clip(folder: Path, seed: int = CLIP_SEED) -> Path:
    """A random CLIP model (32x32 pictures, 8-dimensional embeddings) saved with its processor."""
    tokenizer = tiny_tokenizer(folder / "vocabulary")
    vocab = len(tokenizer)
    torch.manual_seed(seed)
    text = {"vocab_size": vocab, "max_position_embeddings": 77, "bos_token_id": vocab - 2, "eos_token_id": vocab - 1}
    config = CLIPConfig(
        text_config={**text, "pad_token_id": vocab - 1, **_tiny_tower()},
        vision_config={"image_size": SIZE, "patch_size": 8, **_tiny_tower()},
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def _tiny_tower() -> dict[str, int]:
    return {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}


def render_plainly(
    folder: Path | str,
    rows: Sequence[tuple[str, int]],
    *,
    steps: int = 2,
    scheduler_from: Path | None = None,
) -> list[Image.Image]:
    """Each (prompt, seed) picture the way a diffusers user makes it; ``scheduler_from`` swaps in another folder's
    scheduler."""
    pipe = DiffusionPipeline.from_pretrained(folder)
    if scheduler_from is not None:
        reference = DiffusionPipeline.from_pretrained(scheduler_from).scheduler
        pipe.scheduler = type(reference).from_config(reference.config)
    pipe.set_progress_bar_config(disable=True)
    pictures = []
    for prompt, seed in rows:
        generator = torch.Generator("cpu").manual_seed(seed)
        out = pipe(prompt, num_inference_steps=steps, guidance_scale=7.5, height=SIZE, width=SIZE, generator=generator)
        pictures.append(out.images[0])
    return pictures


def cosines(clip_folder: Path, pictures: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
    """Cosine of each picture's CLIP embedding with its prompt's."""
    model = CLIPModel.from_pretrained(clip_folder).eval()
    processor = CLIPProcessor.from_pretrained(clip_folder)
    inputs = processor(text=list(prompts), images=list(pictures), return_tensors="pt", padding=True)
    with torch.no_grad():
        image = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    image = image / image.norm(dim=-1, keepdim=True)
    text = text.pooler_output / text.pooler_output.norm(dim=-1, keepdim=True)
    return (image * text).sum(dim=-1)


def clip_score(clip_folder: Path, pictures: Sequence[Image.Image], prompts: Sequence[str]) -> float:
    """100 * max(cosine, 0), averaged over the pairs."""
    return float((100 * cosines(clip_folder, pictures, prompts).clamp(min=0)).mean())


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.convert("RGB").tobytes() == b.convert("RGB").tobytes()
