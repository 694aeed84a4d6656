"""Tiny random diffusers pipelines for the tests (not shipped in the wheel): SD 1.x-shaped and SDXL-shaped.

They are built from diffusers and transformers config classes, so they have the component folders, tensor names
and ``model_index.json`` of real pipelines at a few hundred KB each, and generate a 32x32 image in milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

_VOCAB_WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "house", "tree", "sky", "painting", "the"]


def tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over a dozen whole words (each word is one token), written from vocab and merges."""
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<|startoftext|>", "<|endoftext|>"]
    letters = sorted({c for w in _VOCAB_WORDS for c in w})
    tokens = [*letters, *[c + "</w>" for c in letters]]
    merges: list[str] = []
    for word in _VOCAB_WORDS:
        current = word[0]
        for i, char in enumerate(word[1:], start=1):
            nxt = char + "</w>" if i == len(word) - 1 else char
            merges.append(f"{current} {nxt}")
            current = current + nxt
            tokens.append(current)
        if len(word) == 1:
            tokens.append(word + "</w>")
    vocab = {t: i for i, t in enumerate(dict.fromkeys([*tokens, *specials]))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _text_config(vocab_size: int, hidden: int = 16, projection: int = 16) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )


def _scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _unet(**options: object) -> UNet2DConditionModel:
    """A two-block UNet of 8 and 16 channels, one layer per block; ``options`` set the family's blocks."""
    return UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        attention_head_dim=2,
        norm_num_groups=4,
        **options,
    )


def sd_pipeline(seed: int, scratch: Path) -> StableDiffusionPipeline:
    """An SD 1.x-shaped pipeline: UNet2DConditionModel, one CLIP text encoder, AutoencoderKL, DDIM."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(scratch / f"tok-{seed}")
    unet = _unet(
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
    )
    text_encoder = CLIPTextModel(_text_config(len(tokenizer)))
    pipe = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe


def sdxl_pipeline(seed: int, scratch: Path) -> StableDiffusionXLPipeline:
    """An SDXL-shaped pipeline: a UNet with text-time embeddings and two text encoders (the second projected)."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(scratch / f"tok-xl-{seed}")
    unet = _unet(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=16 + 6 * 4,
        transformer_layers_per_block=(1, 1),
    )
    vocab = len(tokenizer)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(vocab)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(vocab)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=_scheduler(),
    )
    return pipe


def flux_pipeline(seed: int, scratch: Path) -> FluxPipeline:
    """A Flux-shaped pipeline reduced to what LoRAs adapt: one double and one single block, a CLIP text encoder."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        axes_dims_rope=(2, 2, 4),
    )
    tokenizer = tiny_tokenizer(scratch / f"tok-flux-{seed}")
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=len(tokenizer) - 2,
        eos_token_id=len(tokenizer) - 1,
        pad_token_id=len(tokenizer) - 1,
    )
    return FluxPipeline(
        scheduler=None,
        vae=None,
        text_encoder=CLIPTextModel(config),
        tokenizer=tokenizer,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )


def sd3_pipeline(seed: int, scratch: Path) -> StableDiffusion3Pipeline:
    """An SD3-shaped pipeline reduced to its transformer (one joint block); LoRAs for SD3 mostly adapt only it."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=16,
        pooled_projection_dim=16,
    )
    none = dict.fromkeys(
        ["scheduler", "vae", *(f"{k}{i}" for k in ("text_encoder", "tokenizer") for i in ("", "_2", "_3"))]
    )
    return StableDiffusion3Pipeline(transformer=transformer, **none)


def perturbed(pipe: StableDiffusionPipeline, seed: int, scale: float = 0.05) -> StableDiffusionPipeline:
    """The pipeline with every weight of its UNet, text encoders and VAE moved by seeded noise: a "fine-tune"."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("unet", "transformer", "text_encoder", "text_encoder_2", "vae"):
            module = getattr(pipe, name, None)
            if module is None:
                continue
            for param in module.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * scale)
    return pipe


def make_sd_pool(root: Path, experts: int = 2, *, xl: bool = False) -> tuple[Path, list[Path]]:
    """A base pipeline folder and ``experts`` perturbed copies, each saved with ``save_pretrained``."""
    build = sdxl_pipeline if xl else sd_pipeline
    kind = "sdxl" if xl else "sd"
    base_dir = root / f"{kind}-base"
    build(0, root).save_pretrained(base_dir)
    expert_dirs = []
    for i in range(experts):
        folder = root / f"{kind}-expert-{i}"
        perturbed(build(0, root), seed=100 + i).save_pretrained(folder)
        expert_dirs.append(folder)
    return base_dir, expert_dirs


def generate(folder: Path | str, prompt: str = "a photo of a cat", seed: int = 0) -> torch.Tensor:
    """A 32x32 image in two DDIM steps from a fixed seed, as a float tensor (for exact comparisons)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    out = pipe(prompt, num_inference_steps=2, height=32, width=32, generator=generator, output_type="pt")
    return out.images


_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP_TO_LDM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _unet_key_to_ldm(name: str, per_block: int, up_attention: set[int]) -> str:
    """A diffusers UNet tensor name in the original (LDM) checkpoint layout, for SD 1.x-shaped UNets."""
    parts = name.split(".")
    for top, ldm in _UNET_TOP_TO_LDM.items():
        if name.startswith(top + "."):
            return f"{ldm}.{name[len(top) + 1 :]}"
    if parts[0] in ("down_blocks", "up_blocks"):
        i, kind = int(parts[1]), parts[2]
        if parts[0] == "down_blocks":
            if kind == "downsamplers":
                return f"input_blocks.{1 + i * (per_block + 1) + per_block}.0.op.{parts[-1]}"
            index, slot = 1 + i * (per_block + 1) + int(parts[3]), "0" if kind == "resnets" else "1"
            container = "input_blocks"
        else:
            if kind == "upsamplers":
                slot = "2" if i in up_attention else "1"
                return f"output_blocks.{i * (per_block + 1) + per_block}.{slot}.conv.{parts[-1]}"
            index, slot = i * (per_block + 1) + int(parts[3]), "0" if kind == "resnets" else "1"
            container = "output_blocks"
        rest = parts[4:]
    else:  # mid_block
        kind = parts[1]
        slot = {("resnets", "0"): "0", ("attentions", "0"): "1", ("resnets", "1"): "2"}[(kind, parts[2])]
        container, index, rest = "middle_block", None, parts[3:]
    if kind == "resnets":
        rest = [_RESNET_TO_LDM.get(rest[0], rest[0]), *rest[1:]]
    head = f"{container}.{index}.{slot}" if index is not None else f"{container}.{slot}"
    return f"{head}.{'.'.join(rest)}"


def _vae_key_to_ldm(name: str, blocks: int) -> str:
    """A diffusers AutoencoderKL tensor name in the original layout."""
    parts = name.split(".")
    if parts[0] in ("quant_conv", "post_quant_conv"):
        return name
    side, rest = parts[0], parts[1:]
    if rest[0] == "conv_norm_out":
        return ".".join([side, "norm_out", *rest[1:]])
    if rest[0] in ("conv_in", "conv_out"):
        return name
    if rest[0] == "mid_block":
        if rest[1] == "resnets":
            block = f"block_{int(rest[2]) + 1}"
            tail = [{"conv_shortcut": "nin_shortcut"}.get(rest[3], rest[3]), *rest[4:]]
            return ".".join([side, "mid", block, *tail])
        mapping = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
        tail = rest[3:]
        inner = mapping[tail[0]]
        tail = tail[2:] if tail[0] == "to_out" else tail[1:]
        return ".".join([side, "mid", "attn_1", inner, *tail])
    kind = "down" if rest[0] == "down_blocks" else "up"
    i = int(rest[1]) if kind == "down" else blocks - 1 - int(rest[1])
    if rest[2] in ("downsamplers", "upsamplers"):
        return ".".join([side, kind, str(i), "downsample" if kind == "down" else "upsample", *rest[4:]])
    tail = [{"conv_shortcut": "nin_shortcut"}.get(rest[4], rest[4]), *rest[5:]]
    return ".".join([side, kind, str(i), "block", rest[3], *tail])


def to_single_file(pipeline: Path, path: Path) -> Path:
    """The SD 1.x-shaped pipeline as one original-layout checkpoint (what A1111 and ComfyUI users share): UNet under
    ``model.diffusion_model.``, VAE under ``first_stage_model.`` (attention as 1x1 convolutions), text encoder under
    ``cond_stage_model.transformer.text_model.``. Test data for the single-file path, written from the layout's
    published key names."""
    from safetensors.torch import load_file, save_file

    unet_config = json.loads((pipeline / "unet" / "config.json").read_text())
    per_block = unet_config["layers_per_block"]
    up_attention = {i for i, kind in enumerate(unet_config["up_block_types"]) if "CrossAttn" in kind}
    blocks = len(json.loads((pipeline / "vae" / "config.json").read_text())["block_out_channels"])
    out: dict[str, torch.Tensor] = {}
    for name, value in load_file(pipeline / "unet" / "diffusion_pytorch_model.safetensors").items():
        out["model.diffusion_model." + _unet_key_to_ldm(name, per_block, up_attention)] = value
    for name, value in load_file(pipeline / "vae" / "diffusion_pytorch_model.safetensors").items():
        key = _vae_key_to_ldm(name, blocks)
        if ".mid.attn_1." in key and key.endswith(".weight") and value.dim() == 2:
            value = value[:, :, None, None]
        out["first_stage_model." + key] = value
    for name, value in load_file(pipeline / "text_encoder" / "model.safetensors").items():
        out["cond_stage_model.transformer.text_model." + name] = value
    save_file({k: v.contiguous() for k, v in out.items()}, path)
    return path
