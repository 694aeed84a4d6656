"""A diffusion LoRA read through LoraDeltaCheckpoint equals diffusers' own load_lora_weights + fuse_lora."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import read_checkpoint
from diffusers import (
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.utils import convert_state_dict_to_diffusers
from diffusion_models import flux_pipeline, sd3_pipeline, sd_pipeline, sdxl_pipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from hf_fusion.engine.checkpoint import open_checkpoint
from hf_fusion.engine.diffusion_lora import LoraDeltaCheckpoint, LoraFactors, find_lora_file, read_pipeline_lora
from hf_fusion.errors import CheckpointError, PickleCheckpointError

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "ff.net.0.proj"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]

# kohya module name -> (component, diffusers module path in that component, rank, alpha)
SD_KOHYA = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (
        "unet",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        4,
        1.0,
    ),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (
        "unet",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
        4,
        2.0,
    ),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0": (
        "unet",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
        4,
        2.0,
    ),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj": (
        "unet",
        "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
        4,
        2.0,
    ),
    "lora_unet_down_blocks_0_attentions_0_proj_in": ("unet", "down_blocks.0.attentions.0.proj_in", 4, 2.0),
    "lora_unet_down_blocks_0_resnets_0_conv1": ("unet", "down_blocks.0.resnets.0.conv1", 2, 1.0),
    "lora_unet_up_blocks_1_resnets_0_conv_shortcut": ("unet", "up_blocks.1.resnets.0.conv_shortcut", 4, 2.0),
    "lora_unet_up_blocks_1_resnets_1_time_emb_proj": ("unet", "up_blocks.1.resnets.1.time_emb_proj", 4, 2.0),
    **{
        f"lora_te_text_model_encoder_layers_0_self_attn_{p}": (
            "text_encoder",
            f"text_model.encoder.layers.0.self_attn.{p}",
            4,
            2.0,
        )
        for p in ("q_proj", "k_proj", "v_proj", "out_proj")
    },
    "lora_te_text_model_encoder_layers_1_mlp_fc1": ("text_encoder", "text_model.encoder.layers.1.mlp.fc1", 4, 1.0),
}

# SDXL LoRAs from kohya's trainer number UNet blocks as the original (SGM) code does.
SDXL_KOHYA = {
    "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q": (
        "unet",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        4,
        2.0,
    ),
    "lora_unet_input_blocks_1_0_in_layers_2": ("unet", "down_blocks.0.resnets.0.conv1", 4, 2.0),
    "lora_unet_input_blocks_1_0_emb_layers_1": ("unet", "down_blocks.0.resnets.0.time_emb_proj", 4, 2.0),
    "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k": (
        "unet",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
        4,
        2.0,
    ),
    "lora_unet_output_blocks_0_1_proj_in": ("unet", "up_blocks.0.attentions.0.proj_in", 4, 2.0),
    "lora_unet_output_blocks_1_0_out_layers_3": ("unet", "up_blocks.0.resnets.1.conv2", 2, 2.0),
    **{
        f"lora_te{i}_text_model_encoder_layers_0_self_attn_{p}": (
            "text_encoder" if i == 1 else "text_encoder_2",
            f"text_model.encoder.layers.0.self_attn.{p}",
            4,
            2.0,
        )
        for i in (1, 2)
        for p in ("q_proj", "k_proj", "v_proj", "out_proj")
    },
    "lora_te2_text_model_encoder_layers_1_mlp_fc2": ("text_encoder_2", "text_model.encoder.layers.1.mlp.fc2", 4, 1.0),
}


@pytest.fixture(autouse=True)
def _transformers_adapters(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers 5 refuses peft < 0.22 for its adapter API, which diffusers uses for text-encoder LoRAs; the
    LoRA calls it makes work with the installed peft, so its version check is lifted for these tests only."""
    import transformers.integrations.peft as transformers_peft

    monkeypatch.setattr(transformers_peft, "check_peft_version", lambda min_version: None)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("diffusion-bases")
    sd_pipeline(0, root).save_pretrained(root / "sd")
    sdxl_pipeline(0, root).save_pretrained(root / "sdxl")
    return {"sd": root / "sd", "sdxl": root / "sdxl"}


def _fused_by_diffusers(build: Callable, scratch: Path, lora_file: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The base pipeline's component state dicts after diffusers loads and fuses the LoRA."""
    pipe = build(0, scratch)
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    pipe.fuse_lora(components=list(pipe._lora_loadable_modules), lora_scale=1.0)  # Flux fuses only its transformer
    pipe.unload_lora_weights()
    return {name: c.state_dict() for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


def _assert_dense_equals_fused(
    base_dir: Path, pipeline_class: str, lora_file: Path, fused: dict[str, dict[str, torch.Tensor]]
) -> dict[str, dict]:
    lora = read_pipeline_lora(lora_file, pipeline_class, "lora", base_folder=base_dir)
    for component, factors in lora.items():
        base = open_checkpoint(base_dir / component, component)
        dense = LoraDeltaCheckpoint("lora", base, factors)
        assert dense.entries == base.entries
        before = read_checkpoint(base, 1000)
        got = read_checkpoint(dense, 3)
        expected = fused[component]
        adapted = {n for n in got if not torch.equal(got[n], before[n])}
        assert len(adapted) == len(factors), f"{component}: {len(adapted)} tensors changed, {len(factors)} adapted"
        for name, tensor in got.items():
            if name in adapted:
                torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
            else:
                assert torch.equal(tensor, before[name]) and torch.equal(tensor, expected[name]), name
    return lora


def _add_adapters(pipe, text_encoders: list[str], **unet_options) -> None:
    torch.manual_seed(1)
    options = {"r": 4, "lora_alpha": 8, "init_lora_weights": False}
    pipe.unet.add_adapter(LoraConfig(**{**options, "target_modules": UNET_TARGETS, **unet_options}))
    for name in text_encoders:
        targets = TEXT_TARGETS + (["text_projection"] if name == "text_encoder_2" else [])
        getattr(pipe, name).add_adapter(LoraConfig(target_modules=targets, **options))


@pytest.mark.parametrize("layout", ["peft-with-metadata", "peft", "diffusers-attention-only"])
def test_sd_diffusers_format(bases: dict[str, Path], tmp_path: Path, layout: str) -> None:
    """The UNet in peft format (convolutions included), or in diffusers' older ``lora.down``/``lora.up`` keys as its
    SD training script saves attention-only LoRAs; the text encoder in diffusers' ``lora_linear_layer`` keys. Only
    with metadata does diffusers know the trained alpha (8, a rank and an alpha pattern); else it takes alpha = rank.
    """
    pipe = sd_pipeline(0, tmp_path)
    if layout == "diffusers-attention-only":
        _add_adapters(pipe, ["text_encoder"], target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        unet_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
        assert any(k.endswith("to_q.lora.down.weight") for k in unet_layers)
    else:
        _add_adapters(pipe, ["text_encoder"], rank_pattern={"conv2": 2}, alpha_pattern={"to_v": 3})
        unet_layers = get_peft_model_state_dict(pipe.unet)
    layers = {
        "unet_lora_layers": unet_layers,
        "text_encoder_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder)),
    }
    if layout == "peft-with-metadata":
        layers["unet_lora_adapter_metadata"] = pipe.unet.peft_config["default"].to_dict()
        layers["text_encoder_lora_adapter_metadata"] = pipe.text_encoder.peft_config["default"].to_dict()
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", **layers)
    lora_file = find_lora_file(tmp_path / "lora")
    assert lora_file is not None and lora_file.name == "pytorch_lora_weights.safetensors"

    fused = _fused_by_diffusers(sd_pipeline, tmp_path, lora_file)
    lora = _assert_dense_equals_fused(bases["sd"], "StableDiffusionPipeline", lora_file, fused)
    unet = lora["unet"]
    assert "encoder.layers.0.self_attn.q_proj.weight" in lora["text_encoder"]
    if layout == "diffusers-attention-only":
        assert {f.scale for c in lora.values() for f in c.values()} == {1.0}
        return
    to_v = unet["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v.weight"]
    conv2 = unet["down_blocks.0.resnets.0.conv2.weight"]
    conv1 = unet["down_blocks.0.resnets.0.conv1.weight"]
    assert conv1.down.shape == (4, 8, 3, 3) and conv1.up.shape == (8, 4, 1, 1) and conv2.rank == 2
    if layout == "peft-with-metadata":
        assert (conv1.scale, conv2.scale, to_v.scale) == (2.0, 4.0, 0.75)
    else:
        assert {f.scale for c in lora.values() for f in c.values()} == {1.0}


def test_mixed_key_formats_are_refused(bases: dict[str, Path], tmp_path: Path) -> None:
    """Attention in ``lora.down`` keys beside convolutions in ``lora_A`` keys: diffusers converts by the first key's
    format and silently skips the rest, so such a file is refused rather than half applied."""
    pipe = sd_pipeline(0, tmp_path)
    _add_adapters(pipe, [])
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=layers)
    with pytest.raises(
        CheckpointError, match=r"mixed: LoRA key unet\..*\.lora\.(down|up)\.weight is not a LoRA factor"
    ):
        read_pipeline_lora(tmp_path / "lora", "StableDiffusionPipeline", "mixed", base_folder=bases["sd"])


def test_sdxl_peft_format(bases: dict[str, Path], tmp_path: Path) -> None:
    pipe = sdxl_pipeline(0, tmp_path)
    _add_adapters(pipe, ["text_encoder", "text_encoder_2"])
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path / "lora",
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        text_encoder_2_lora_layers=get_peft_model_state_dict(pipe.text_encoder_2),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["default"].to_dict(),
        text_encoder_2_lora_adapter_metadata=pipe.text_encoder_2.peft_config["default"].to_dict(),
    )
    lora_file = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    fused = _fused_by_diffusers(sdxl_pipeline, tmp_path, lora_file)
    lora = _assert_dense_equals_fused(bases["sdxl"], "StableDiffusionXLPipeline", lora_file, fused)
    assert set(lora) == {"unet", "text_encoder", "text_encoder_2"}
    assert "text_projection.weight" in lora["text_encoder_2"]
    assert {f.scale for c in lora.values() for f in c.values()} == {2.0}


def _write_kohya(pipe, modules: dict[str, tuple[str, str, int, float]], path: Path, extra: dict | None = None) -> None:
    """A kohya/A1111 LoRA file: ``<name>.lora_down.weight``, ``.lora_up.weight`` and ``.alpha`` per module."""
    g = torch.Generator().manual_seed(2)
    tensors: dict[str, torch.Tensor] = {}
    for name, (component, module_path, rank, alpha) in modules.items():
        model = getattr(pipe, component)
        if not hasattr(model, "text_model"):
            module_path = module_path.removeprefix("text_model.")
        weight = model.get_submodule(module_path).weight
        down_shape = (rank, weight.shape[1], *weight.shape[2:])
        up_shape = (weight.shape[0], rank, *[1] * (weight.dim() - 2))
        tensors[f"{name}.lora_down.weight"] = torch.randn(down_shape, generator=g) * 0.1
        tensors[f"{name}.lora_up.weight"] = torch.randn(up_shape, generator=g) * 0.1
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    tensors.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path)


def test_sd_kohya_format(bases: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Alphas vary by module: diffusers applies those of resnets and projections, but keys those of attention
    and text-encoder modules by names no module has, so they get the most common alpha; the dense view agrees."""
    lora_file = tmp_path / "kohya" / "sd_lora.safetensors"
    _write_kohya(sd_pipeline(0, tmp_path), SD_KOHYA, lora_file)
    assert find_lora_file(lora_file.parent) == lora_file
    with pytest.warns(RuntimeWarning, match="alpha_pattern keys did not match any targeted module"):  # peft says so
        fused = _fused_by_diffusers(sd_pipeline, tmp_path, lora_file)
    with caplog.at_level(logging.WARNING, logger="hf_fusion.engine.diffusion_lora"):
        lora = _assert_dense_equals_fused(bases["sd"], "StableDiffusionPipeline", lora_file, fused)
    assert "instead of the LoRA's own alpha" in caplog.text
    unet, te = lora["unet"], lora["text_encoder"]
    assert {f"{path}.weight" for c, path, _, _ in SD_KOHYA.values() if c == "unet"} == set(unet)
    assert unet["down_blocks.0.resnets.0.conv1.weight"].scale == 1.0 / 2
    assert unet["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"].scale == 2.0 / 4
    assert te["encoder.layers.1.mlp.fc1.weight"].scale == 2.0 / 4
    without_base = read_pipeline_lora(lora_file, "StableDiffusionPipeline", "lora")
    assert {c: {n: f.scale for n, f in fs.items()} for c, fs in without_base.items()} == {
        c: {n: f.scale for n, f in fs.items()} for c, fs in lora.items()
    }


def test_sdxl_kohya_format_with_sgm_block_numbers(bases: dict[str, Path], tmp_path: Path) -> None:
    lora_file = tmp_path / "kohya" / "sdxl_lora.safetensors"
    _write_kohya(sdxl_pipeline(0, tmp_path), SDXL_KOHYA, lora_file)
    fused = _fused_by_diffusers(sdxl_pipeline, tmp_path, lora_file)
    lora = _assert_dense_equals_fused(bases["sdxl"], "StableDiffusionXLPipeline", lora_file, fused)
    assert {f"{path}.weight" for c, path, _, _ in SDXL_KOHYA.values() if c == "unet"} == set(lora["unet"])
    # text_encoder_2 keeps its text_model submodule in transformers 5, so diffusers applies this MLP's own alpha
    assert lora["text_encoder_2"]["text_model.encoder.layers.1.mlp.fc2.weight"].scale == 1.0 / 4
    assert "encoder.layers.0.self_attn.q_proj.weight" in lora["text_encoder"]
    with pytest.raises(CheckpointError, match="give the base folder"):
        read_pipeline_lora(lora_file, "StableDiffusionXLPipeline", "sdxl-lora")


def test_lora_for_another_base_is_refused(bases: dict[str, Path], tmp_path: Path) -> None:
    lora_file = tmp_path / "sdxl_lora.safetensors"
    _write_kohya(sdxl_pipeline(0, tmp_path), SDXL_KOHYA, lora_file)
    with pytest.raises(CheckpointError, match="text_encoder_2.*StableDiffusionPipeline loads LoRAs into"):
        read_pipeline_lora(lora_file, "StableDiffusionPipeline", "sdxl-lora", base_folder=bases["sd"])
    unet_only = {k: v for k, v in SDXL_KOHYA.items() if v[0] == "unet" and "input_blocks" not in k}
    _write_kohya(sdxl_pipeline(0, tmp_path), unet_only, lora_file)
    factors = read_pipeline_lora(lora_file, "StableDiffusionPipeline", "sdxl-lora", base_folder=bases["sd"])
    sd_unet = open_checkpoint(bases["sd"] / "unet", "sd-unet")
    with pytest.raises(CheckpointError, match=r"sdxl-lora: .*(lacks|do not fit).*is it a LoRA for this base\?"):
        LoraDeltaCheckpoint("sdxl-lora", sd_unet, factors["unet"])
    sd_te = open_checkpoint(bases["sd"] / "text_encoder", "sd-te")
    wide = {"encoder.layers.0.self_attn.q_proj.weight": _factors_of_shape((16, 32))}
    with pytest.raises(CheckpointError, match=r"q_proj.weight.*\[16, 4\].*\[4, 32\].*\[16, 16\]"):
        LoraDeltaCheckpoint("wide", sd_te, wide)


def _factors_of_shape(shape: tuple[int, int]) -> LoraFactors:
    return LoraFactors(down=torch.zeros(4, shape[1]), up=torch.zeros(shape[0], 4), scale=1.0)


def test_unknown_kohya_keys_are_refused(bases: dict[str, Path], tmp_path: Path) -> None:
    pipe = sd_pipeline(0, tmp_path)
    some = dict(list(SD_KOHYA.items())[:2])
    lycoris = tmp_path / "loha.safetensors"
    _write_kohya(pipe, some, lycoris, extra={"lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match="loha: diffusers cannot read loha.safetensors.*hada_w1_a"):
        read_pipeline_lora(lycoris, "StableDiffusionPipeline", "loha", base_folder=bases["sd"])
    stray = tmp_path / "stray.safetensors"
    _write_kohya(pipe, some, stray, extra={"lora_vae_decoder_conv_in.lora_down.weight": torch.zeros(2, 2)})
    with pytest.raises(
        CheckpointError,
        match="stray: a kohya-format LoRA whose key 'lora_vae_decoder_conv_in.lora_down.weight' starts with none",
    ):
        read_pipeline_lora(stray, "StableDiffusionPipeline", "stray", base_folder=bases["sd"])
    renamed = tmp_path / "renamed.safetensors"
    unknown = {"lora_unet_down_blocks_0_resnets_0_conv9": ("unet", "down_blocks.0.resnets.0.conv1", 4, 4.0)}
    _write_kohya(pipe, {**some, **unknown}, renamed)
    factors = read_pipeline_lora(renamed, "StableDiffusionPipeline", "renamed", base_folder=bases["sd"])
    with pytest.raises(CheckpointError, match="renamed: the LoRA adapts 'down_blocks.0.resnets.0.conv9.weight'"):
        LoraDeltaCheckpoint("renamed", open_checkpoint(bases["sd"] / "unet", "unet"), factors["unet"])


def test_dora_and_unsupported_pipelines_are_refused(bases: dict[str, Path], tmp_path: Path) -> None:
    dora = tmp_path / "dora.safetensors"
    _write_kohya(
        sd_pipeline(0, tmp_path),
        dict(list(SD_KOHYA.items())[:1]),
        dora,
        extra={"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.dora_scale": torch.ones(1, 8)},
    )
    with pytest.raises(CheckpointError, match="dora: DoRA LoRAs are not supported"):
        read_pipeline_lora(dora, "StableDiffusionPipeline", "dora")
    plain = tmp_path / "plain.safetensors"
    _write_kohya(sd_pipeline(0, tmp_path), dict(list(SD_KOHYA.items())[:1]), plain)
    with pytest.raises(CheckpointError, match="DDPMPipeline does not load LoRAs"):
        read_pipeline_lora(plain, "DDPMPipeline", "plain")
    with pytest.raises(CheckpointError, match="no pipeline class 'NoSuchPipeline'"):
        read_pipeline_lora(plain, "NoSuchPipeline", "plain")


def test_metadata_for_some_components_only_is_refused(tmp_path: Path) -> None:
    """diffusers itself cannot load such a file: the text encoder gets an adapter config with no targets."""
    pipe = sd_pipeline(0, tmp_path)
    _add_adapters(pipe, ["text_encoder"])
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "lora",
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
    )
    with pytest.raises(
        CheckpointError, match="partial: the LoRA's adapter metadata names no target modules for text_enc"
    ):
        read_pipeline_lora(tmp_path / "lora", "StableDiffusionPipeline", "partial")


def test_find_lora_file(bases: dict[str, Path], tmp_path: Path) -> None:
    assert find_lora_file(bases["sd"]) is None  # a pipeline, not a LoRA
    assert find_lora_file(bases["sd"] / "unet" / "diffusion_pytorch_model.safetensors") is None
    assert find_lora_file(tmp_path / "missing") is None
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({"unet.a.lora.down.weight": torch.zeros(1)}, pickled / "pytorch_lora_weights.bin")
    with pytest.raises(PickleCheckpointError, match="pickle"):
        find_lora_file(pickled)
    with pytest.raises(PickleCheckpointError, match="pickle"):
        find_lora_file(pickled / "pytorch_lora_weights.bin")
    two = tmp_path / "two"
    for name in ("a.safetensors", "b.safetensors"):
        _write_kohya(sd_pipeline(0, tmp_path), dict(list(SD_KOHYA.items())[:1]), two / name)
    with pytest.raises(CheckpointError, match="holds 2 safetensors files .*exactly one"):
        find_lora_file(two)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_transformer_peft_format(tmp_path: Path, family: str) -> None:
    """Flux with the adapter config as metadata (alpha 8), SD3 without (diffusers then takes alpha = rank)."""
    build = flux_pipeline if family == "flux" else sd3_pipeline
    build(0, tmp_path).save_pretrained(tmp_path / "base")
    pipe = build(0, tmp_path)
    torch.manual_seed(1)
    targets = [
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "proj_mlp",
        "proj_out",
        "ff.net.0.proj",
        "norm1.linear",
    ]
    if family == "sd3":
        targets.remove("proj_mlp")
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets))
    metadata = pipe.transformer.peft_config["default"].to_dict() if family == "flux" else None
    type(pipe).save_lora_weights(
        tmp_path / "lora",
        transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
        transformer_lora_adapter_metadata=metadata,
    )
    lora_file = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    fused = _fused_by_diffusers(build, tmp_path, lora_file)
    lora = _assert_dense_equals_fused(tmp_path / "base", type(pipe).__name__, lora_file, fused)
    assert "transformer_blocks.0.attn.add_q_proj.weight" in lora["transformer"]
    assert {f.scale for f in lora["transformer"].values()} == ({2.0} if family == "flux" else {1.0})


# kohya module name -> (component, the diffusers modules its weight is split into)
FLUX_KOHYA = {
    "lora_unet_double_blocks_0_img_attn_qkv": ("transformer", ["transformer_blocks.0.attn.to_" + c for c in "qkv"]),
    "lora_unet_double_blocks_0_txt_attn_qkv": (
        "transformer",
        ["transformer_blocks.0.attn.add_" + c + "_proj" for c in "qkv"],
    ),
    "lora_unet_double_blocks_0_img_attn_proj": ("transformer", ["transformer_blocks.0.attn.to_out.0"]),
    "lora_unet_double_blocks_0_img_mlp_0": ("transformer", ["transformer_blocks.0.ff.net.0.proj"]),
    "lora_unet_double_blocks_0_txt_mod_lin": ("transformer", ["transformer_blocks.0.norm1_context.linear"]),
    "lora_unet_single_blocks_0_linear2": ("transformer", ["single_transformer_blocks.0.proj_out"]),
    "lora_unet_single_blocks_0_modulation_lin": ("transformer", ["single_transformer_blocks.0.norm.linear"]),
    **{
        f"lora_te1_text_model_encoder_layers_0_self_attn_{p}": ("text_encoder", [f"encoder.layers.0.self_attn.{p}"])
        for p in ("q_proj", "k_proj", "v_proj", "out_proj")
    },
}


def test_flux_kohya_format(tmp_path: Path) -> None:
    """diffusers' Flux converter splits kohya's fused qkv projections and bakes alpha / rank into the factors."""
    flux_pipeline(0, tmp_path).save_pretrained(tmp_path / "base")
    pipe = flux_pipeline(0, tmp_path)
    g = torch.Generator().manual_seed(2)
    tensors = {}
    for name, (component, modules) in FLUX_KOHYA.items():
        model = getattr(pipe, component)
        rows = sum(model.get_submodule(m).weight.shape[0] for m in modules)
        columns = model.get_submodule(modules[0]).weight.shape[1]
        tensors[f"{name}.lora_down.weight"] = torch.randn(4, columns, generator=g) * 0.1
        tensors[f"{name}.lora_up.weight"] = torch.randn(rows, 4, generator=g) * 0.1
        tensors[f"{name}.alpha"] = torch.tensor(2.0 if component == "transformer" else 1.0)
    lora_file = tmp_path / "kohya" / "flux_lora.safetensors"
    lora_file.parent.mkdir()
    save_file(tensors, lora_file)
    fused = _fused_by_diffusers(flux_pipeline, tmp_path, lora_file)
    lora = _assert_dense_equals_fused(tmp_path / "base", "FluxPipeline", lora_file, fused)
    assert {f"{m}.weight" for c, ms in FLUX_KOHYA.values() if c == "transformer" for m in ms} == set(
        lora["transformer"]
    )
    assert {f.scale for c in lora.values() for f in c.values()} == {1.0}  # alphas are baked into the factors
