"""Block-weight presets: one value per block of real SD 1.x and SDXL UNets, reaching each block's tensors through
the recipe's per-tensor parameters, and the down / mid / up filters."""

from __future__ import annotations

import pytest
import torch
import yaml
from diffusers import UNet2DConditionModel

from hf_fusion.engine.blocks import component_positions, unet_blocks
from hf_fusion.errors import RecipeError
from hf_fusion.fusion import as_recipe, validate_recipe
from hf_fusion.space.block_presets import DOWN_MID_UP, PRESETS, SD1, SDXL, SHAPES, block_values, preset_yaml

SD1_UNET = {
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}
SDXL_UNET = {
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 2048,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}


def unet_names(config: dict) -> list[str]:
    """The tensor names of a full-size UNet, built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        return list(UNet2DConditionModel(**config).state_dict())


def resolved(text: str, names: list[str], component: str = "unet") -> dict[str, float]:
    """What each tensor's scaling_factor resolves to when the preset text is a task-arithmetic recipe's value."""
    parameters = yaml.safe_load(text)
    checked = validate_recipe(
        as_recipe({"method": "task_arithmetic", "models": ["org/a"], "base": "org/b", "parameters": parameters}, {})
    )
    positions = component_positions(names)
    return {n: checked.schedule.resolve(f"{component}.{n}", positions[n]).scaling_factor for n in names}


@pytest.mark.parametrize(("layout", "config"), [(SD1, SD1_UNET), (SDXL, SDXL_UNET)])
def test_each_block_of_a_real_unet_takes_its_own_preset_value(layout, config) -> None:
    names = unet_names(config)
    blocks = unet_blocks(names)
    assert max(blocks.values()) + 1 == layout.blocks
    assert blocks["mid_block.resnets.0.conv1.weight"] == layout.middle
    for shape in SHAPES:
        preset = next(name for name, chosen in PRESETS.items() if chosen == (layout, shape))
        values = block_values(layout, shape, 0.1, 0.9)
        assert len(values) == layout.blocks and min(values) == pytest.approx(0.1) and max(values) == pytest.approx(0.9)
        factors = resolved(preset_yaml(preset, "scaling_factor", 0.1, 0.9, 0.3), names)
        for name in names:
            assert factors[name] == pytest.approx(values[blocks[name]], abs=1e-9), (shape, name)
    other = resolved(preset_yaml(preset, "scaling_factor", 0.1, 0.9, 0.3), ["final_layer_norm.weight"], "text_encoder")
    assert other == {"final_layer_norm.weight": pytest.approx(0.3)}  # not a UNet tensor: the form's value


def test_named_shapes_put_high_and_low_where_they_say() -> None:
    ramp = block_values(SD1, "ramp up, IN00 low to the last OUT high", 0, 1)
    assert ramp[0] == 0 and ramp[-1] == 1 and ramp == sorted(ramp)
    inputs = block_values(SDXL, "input blocks high, the rest low", 0.2, 0.6)
    assert inputs == [0.6] * 9 + [0.2] * 10
    vee = block_values(SD1, "V: both ends high, the middle low", 0, 1)
    assert vee[0] == vee[-1] == 1 and vee[12] == 0 and vee == vee[::-1]


def test_down_mid_up_filters_and_other_tensors() -> None:
    names = unet_names(SD1_UNET)
    factors = resolved(preset_yaml(DOWN_MID_UP, "scaling_factor", 0.2, 0.8, 0.4), names)
    for name, value in factors.items():
        expected = (
            0.2
            if name.startswith("down_blocks.")
            else 0.5
            if name.startswith("mid_block.")
            else 0.8
            if name.startswith("up_blocks.")
            else 0.4
        )
        assert value == pytest.approx(expected), name
    without_other = yaml.safe_load(preset_yaml(DOWN_MID_UP, "t", 0, 1, None))
    assert without_other == {
        "t": [
            {"filter": "unet.down_blocks", "value": 0},
            {"filter": "unet.mid_block", "value": 0.5},
            {"filter": "unet.up_blocks", "value": 1},
        ]
    }


def test_unknown_presets_and_values_are_refused() -> None:
    with pytest.raises(RecipeError, match="unknown block preset"):
        preset_yaml("SD 3 everything", "t", 0, 1, None)
    with pytest.raises(RecipeError, match="low value must be a number"):
        preset_yaml(DOWN_MID_UP, "t", None, 1, None)  # type: ignore[arg-type]
