"""A LoRA adapter read through LoraCheckpoint equals peft's own merge_and_unload, slice by slice."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import read_checkpoint
from peft import LoraConfig, get_peft_model
from toy import bert, gpt2

from hf_fusion.engine.checkpoint import open_checkpoint
from hf_fusion.engine.lora import LoraCheckpoint
from hf_fusion.errors import CheckpointError


def _train_a_little(model: torch.nn.Module) -> None:
    """LoRA B starts at zero; give every adapter parameter a value so the merge is visible."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("case", ["bert-backbone-base", "bert-task-base", "gpt2-conv1d", "embeddings-rslora"])
def test_dense_view_equals_peft_merge(case: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    if case.startswith("bert"):
        task = bert(num_labels=4)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"], task_type="SEQ_CLS")
        base_model = task.bert if case == "bert-backbone-base" else task
    elif case == "gpt2-conv1d":
        task = gpt2()
        config = LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
        base_model = task
    else:
        task = bert(num_labels=2)
        config = LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["word_embeddings", "query"],
            use_rslora=True,
            alpha_pattern={"query": 2.0},
            task_type="SEQ_CLS",
        )
        base_model = task.bert
    base_model.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(copy.deepcopy(task), config)
    _train_a_little(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload().state_dict()

    base = open_checkpoint(tmp_path / "base", "base")
    dense = LoraCheckpoint("adapter", tmp_path / "adapter", base)
    expected_names = {k for k in merged if not k.endswith("position_ids")}
    if case == "gpt2-conv1d":
        expected_names.discard("lm_head.weight")  # tied to wte, stored once
    assert set(dense.entries) == expected_names
    for rows in (1000, 3):
        got = read_checkpoint(dense, rows)
        for name in expected_names:
            torch.testing.assert_close(got[name], merged[name], rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_adapter_for_another_base_is_named(tmp_path: Path) -> None:
    torch.manual_seed(0)
    peft_model = get_peft_model(bert(), LoraConfig(r=2, target_modules=["query"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    gpt2().save_pretrained(tmp_path / "other")
    with pytest.raises(CheckpointError, match="the adapter targets .*query.weight.*which the base other lacks"):
        LoraCheckpoint("adapter", tmp_path / "adapter", open_checkpoint(tmp_path / "other", "other"))


def test_dora_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = bert()
    model.save_pretrained(tmp_path / "base")
    get_peft_model(model, LoraConfig(r=2, target_modules=["query"], use_dora=True)).save_pretrained(tmp_path / "a")
    with pytest.raises(CheckpointError, match="DoRA"):
        LoraCheckpoint("a", tmp_path / "a", open_checkpoint(tmp_path / "base", "base"))
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["use_dora"]
