"""LoRA adapters as experts: fused as the dense models peft would merge, heads kept out of the backbone."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import reference as ref
import torch
from peft import LoraConfig, get_peft_model
from toy import bert, example_inputs
from transformers import AutoConfig, AutoModel, BertModel

import hf_fusion
from hf_fusion.errors import RecipeError


@pytest.fixture(scope="module")
def lora_pool(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A bare BertModel base and three LoRA classifiers (2, 3, 5 labels) trained 'a little' on top of it."""
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    task0 = bert(num_labels=2)
    task0.bert.save_pretrained(root / "base")
    experts, dense = [], []
    for i, labels in enumerate((2, 3, 5)):
        task = bert(num_labels=labels)
        task.bert.load_state_dict(task0.bert.state_dict())
        model = get_peft_model(
            task, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"], task_type="SEQ_CLS")
        )
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name or "modules_to_save" in name:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
        model.save_pretrained(root / f"lora{i}")
        adapter_config = json.loads((root / f"lora{i}" / "adapter_config.json").read_text())
        adapter_config["base_model_name_or_path"] = str(root / "base")  # as peft records it for a Hub base
        (root / f"lora{i}" / "adapter_config.json").write_text(json.dumps(adapter_config))
        task.config.save_pretrained(root / f"lora{i}")  # the task model's config, as the built-in pools ship it
        dense.append({k: v for k, v in copy.deepcopy(model).merge_and_unload().state_dict().items()})
        experts.append(root / f"lora{i}")
    return {"base": root / "base", "experts": experts, "dense": dense}


def _backbone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("bert.") :]: v for k, v in state.items() if k.startswith("bert.") and v.is_floating_point()}


def test_lora_experts_fuse_into_the_base_architecture(lora_pool: dict, tmp_path: Path) -> None:
    result = hf_fusion.merge(
        models=[str(e) for e in lora_pool["experts"]],
        base=str(lora_pool["base"]),
        method="ties_merging",
        heads=["classifier.*"],
        output=tmp_path / "o",
        show_progress=False,
    )
    base_state = ref.load_state(lora_pool["base"])
    expected = ref.ties(base_state, [_backbone(d) for d in lora_pool["dense"]], 0.3, 20)
    fused = ref.load_state(tmp_path / "o")
    assert set(fused) == set(expected)  # base names, no heads
    for name, value in expected.items():
        torch.testing.assert_close(fused[name].double(), value, rtol=2e-5, atol=2e-6, msg=lambda m: f"{name}: {m}")
    assert AutoConfig.from_pretrained(tmp_path / "o").architectures == ["BertModel"]
    assert not (tmp_path / "o" / "adapter_config.json").exists()
    model = AutoModel.from_pretrained(tmp_path / "o")
    assert isinstance(model, BertModel)
    with torch.no_grad():
        assert model(**example_inputs("bert")).last_hidden_state.isfinite().all()
    assert result.recipe.heads == ["classifier.*"]


def test_adapters_name_their_own_base(lora_pool: dict, tmp_path: Path) -> None:
    """simple_average ignores --base, but the adapters still need theirs: adapter_config names it."""
    result = hf_fusion.merge(
        models=[str(e) for e in lora_pool["experts"]],
        method="simple_average",
        heads=["classifier.*"],
        output=tmp_path / "o",
        show_progress=False,
    )
    expected = ref.simple_average([_backbone(d) for d in lora_pool["dense"]])
    fused = ref.load_state(tmp_path / "o")
    for name, value in expected.items():
        torch.testing.assert_close(fused["bert." + name].double(), value, rtol=1e-5, atol=1e-6)
    assert result.recipe.base is not None and result.recipe.base.path == str(lora_pool["base"])


def _copy_with_base(folder: Path, target: Path, base: str | None) -> Path:
    target.mkdir()
    for f in folder.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    config = json.loads((target / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base
    (target / "adapter_config.json").write_text(json.dumps(config))
    return target


def test_adapters_without_one_known_base_are_refused(lora_pool: dict, tmp_path: Path) -> None:
    orphans = [_copy_with_base(e, tmp_path / f"orphan{i}", None) for i, e in enumerate(lora_pool["experts"][:2])]
    args = dict(method="simple_average", heads=["classifier.*"], show_progress=False)
    with pytest.raises(RecipeError, match="orphan0 is a LoRA adapter that names no base model: pass --base"):
        hf_fusion.merge(models=[str(o) for o in orphans], output=tmp_path / "a", **args)
    other = _copy_with_base(lora_pool["experts"][2], tmp_path / "other", "someone/else")
    with pytest.raises(RecipeError, match="the LoRA adapters name different base models"):
        hf_fusion.merge(models=[str(lora_pool["experts"][0]), str(other)], output=tmp_path / "b", **args)
    hf_fusion.merge(models=[str(o) for o in orphans], base=str(lora_pool["base"]), output=tmp_path / "c", **args)
    assert (tmp_path / "c" / "model.safetensors").is_file()


def test_heads_of_different_shapes_need_heads(lora_pool: dict, tmp_path: Path) -> None:
    from hf_fusion.errors import IncompatibleModelsError

    with pytest.raises(IncompatibleModelsError, match=r"tensor 'classifier\.(weight|bias)' has shape"):
        hf_fusion.merge(
            models=[str(e) for e in lora_pool["experts"]],
            base=str(lora_pool["base"]),
            method="task_arithmetic",
            output=tmp_path / "o",
            show_progress=False,
        )
