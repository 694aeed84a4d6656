"""Block indices of diffusion backbones: the order block-weight merges count UNet and Flux blocks in."""

from __future__ import annotations

import pytest
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel, UNet2DConditionModel

from hf_fusion.engine.blocks import component_positions, diffusion_blocks, unet_blocks


def _names(model) -> list[str]:
    return list(model.state_dict())


@pytest.fixture(scope="module")
def sd15_names() -> list[str]:
    with init_empty_weights():
        return _names(UNet2DConditionModel(cross_attention_dim=768))


@pytest.fixture(scope="module")
def sdxl_names() -> list[str]:
    with init_empty_weights():
        unet = UNet2DConditionModel(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280),
            transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048,
            addition_embed_type="text_time",
            projection_class_embeddings_input_dim=2816,
            addition_time_embed_dim=256,
        )
    return _names(unet)


def test_sd15_unet_has_supermergers_25_blocks(sd15_names: list[str]) -> None:
    blocks = unet_blocks(sd15_names)
    assert sorted(set(blocks.values())) == list(range(25))
    # IN00 is the input convolution and time embedding; LDM's input_blocks.1..11 follow in order
    assert blocks["conv_in.weight"] == blocks["time_embedding.linear_1.weight"] == 0
    assert blocks["down_blocks.0.resnets.0.conv1.weight"] == 1
    assert blocks["down_blocks.0.attentions.1.proj_in.weight"] == 2
    assert blocks["down_blocks.0.downsamplers.0.conv.weight"] == 3
    assert blocks["down_blocks.3.resnets.1.conv1.weight"] == 11
    assert blocks["mid_block.resnets.1.conv1.weight"] == blocks["mid_block.attentions.0.proj_in.weight"] == 12
    assert blocks["up_blocks.0.resnets.0.conv1.weight"] == 13  # OUT00
    assert blocks["up_blocks.0.upsamplers.0.conv.weight"] == 15  # with the last ResNet of its block: OUT02
    assert blocks["up_blocks.3.attentions.2.proj_out.weight"] == 24  # OUT11
    assert blocks["conv_out.weight"] == 24


def test_sdxl_unet_has_19_blocks(sdxl_names: list[str]) -> None:
    blocks = unet_blocks(sdxl_names)
    assert sorted(set(blocks.values())) == list(range(19))
    assert blocks["add_embedding.linear_1.weight"] == 0
    assert blocks["down_blocks.2.attentions.1.transformer_blocks.9.attn1.to_q.weight"] == 8  # IN08
    assert blocks["mid_block.resnets.0.conv1.weight"] == 9
    assert blocks["up_blocks.2.resnets.2.conv1.weight"] == 18


def test_flux_counts_double_then_single_blocks() -> None:
    with init_empty_weights():
        names = _names(FluxTransformer2DModel(num_layers=19, num_single_layers=38))
    blocks = diffusion_blocks(names)
    assert blocks is not None and sorted(set(blocks.values())) == list(range(57))
    assert blocks["transformer_blocks.18.attn.to_q.weight"] == 18
    assert blocks["single_transformer_blocks.0.proj_out.weight"] == 19
    assert blocks["proj_out.weight"] == 56


def test_a_gradient_of_one_value_per_block_gives_each_block_its_value(sd15_names: list[str]) -> None:
    positions = component_positions(sd15_names)
    blocks = unet_blocks(sd15_names)
    for name, block in blocks.items():
        assert positions[name] * 24 == pytest.approx(block)
    # components without blocks (text encoders) keep layer positions
    assert diffusion_blocks(["text_model.encoder.layers.0.mlp.fc1.weight"]) is None
