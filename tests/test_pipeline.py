"""The merge pipeline end to end: layouts, dtypes, tied weights, side files, reproducibility."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import reference as ref
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from toy import clip_full, example_inputs, make_pool
from transformers import AutoConfig, AutoModel, CLIPVisionModel, GPT2LMHeadModel

import hf_fusion
from hf_fusion.recipe import RECIPE_FILENAME


def _dtypes(folder: Path) -> set[str]:
    out = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            out |= {str(h.get_slice(k).get_dtype()) for k in h.keys()}
    return out


def test_bfloat16_models_stay_bfloat16_unless_asked(tmp_path: Path) -> None:
    base, experts = make_pool(tmp_path, "bert", 2, dtype=torch.bfloat16)
    args = dict(models=[str(e) for e in experts], base=str(base), method="task_arithmetic", show_progress=False)
    hf_fusion.merge(output=tmp_path / "auto", **args)
    assert _dtypes(tmp_path / "auto") == {"BF16"}
    hf_fusion.merge(output=tmp_path / "f32", dtype="float32", **args)
    assert _dtypes(tmp_path / "f32") == {"F32"}
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"
    expected = ref.task_arithmetic(ref.load_state(base), [ref.load_state(e) for e in experts], 0.3)
    got = ref.load_state(tmp_path / "f32")
    for k, v in expected.items():
        torch.testing.assert_close(got[k].double(), v, rtol=1e-5, atol=1e-6)
    auto = ref.load_state(tmp_path / "auto")
    for k, v in expected.items():  # computed in float32, rounded once to bfloat16: within one bfloat16 step
        torch.testing.assert_close(auto[k].double(), v, rtol=2**-8, atol=1e-6)
    model = AutoModel.from_pretrained(tmp_path / "f32")
    assert model.dtype == torch.float32


def test_mixed_precision_inputs(tmp_path: Path) -> None:
    base, experts = make_pool(tmp_path, "gpt2", 2)
    half = tmp_path / "half"
    GPT2LMHeadModel.from_pretrained(experts[1]).half().save_pretrained(half)
    hf_fusion.merge(
        models=[str(experts[0]), str(half)], base=str(base), method="ties", output=tmp_path / "o", show_progress=False
    )
    assert _dtypes(tmp_path / "o") == {"F32"}  # follows the base
    expected = ref.ties(ref.load_state(base), [ref.load_state(experts[0]), ref.load_state(half)], 0.3, 20)
    got = ref.load_state(tmp_path / "o")
    for k, v in expected.items():
        torch.testing.assert_close(got[k].double(), v, rtol=2e-5, atol=2e-6)


def test_sharded_inputs_and_outputs(tmp_path: Path) -> None:
    base, experts = make_pool(tmp_path, "gpt2", 2, max_shard_size="40KB")
    assert (base / "model.safetensors.index.json").is_file()
    out = tmp_path / "o"
    result = hf_fusion.merge(
        models=[str(e) for e in experts],
        base=str(base),
        method="task_arithmetic",
        output=out,
        max_shard_bytes=30_000,
        show_progress=False,
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    assert set(result.files) >= {*shards, "model.safetensors.index.json", "config.json", RECIPE_FILENAME}
    expected = ref.task_arithmetic(ref.load_state(base), [ref.load_state(e) for e in experts], 0.3)
    model = GPT2LMHeadModel.from_pretrained(out)
    state = model.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(state[k].double(), v, rtol=1e-5, atol=1e-6)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_tied_copy_saved_by_one_model_only(tmp_path: Path) -> None:
    """One expert stores the tied lm_head explicitly; the others omit it. The copy must follow its primary."""
    base, experts = make_pool(tmp_path, "gpt2", 3)
    untied = load_file(experts[0] / "model.safetensors")
    untied["lm_head.weight"] = untied["transformer.wte.weight"].clone()
    save_file(untied, experts[0] / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "o"
    hf_fusion.merge(
        models=[str(e) for e in experts], base=str(base), method="dare_ties", output=out, show_progress=False
    )
    fused = load_file(out / "model.safetensors")
    assert torch.equal(fused["lm_head.weight"], fused["transformer.wte.weight"])
    states = [ref.load_state(e) for e in experts]
    for s in states:
        s.pop("lm_head.weight", None)
    expected = ref.ties(
        ref.load_state(base), states, 0.5, 20, task_vectors=ref.dare_task_vectors(ref.load_state(base), states, 0.5, 0)
    )
    for k, v in expected.items():
        torch.testing.assert_close(fused[k].double(), v, rtol=2e-5, atol=2e-6)


def test_integer_tensors_and_excluded_tensors_come_from_the_base(tmp_path: Path) -> None:
    base, experts = make_pool(tmp_path, "bert", 2)
    for i, folder in enumerate([base, *experts]):
        state = load_file(folder / "model.safetensors")
        state["extra.position_ids"] = torch.arange(8, dtype=torch.int64) + i
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "o"
    result = hf_fusion.merge(
        models=[str(e) for e in experts],
        base=str(base),
        method="task_arithmetic",
        output=out,
        exclude=["classifier.*"],
        show_progress=False,
    )
    fused, base_state = load_file(out / "model.safetensors"), load_file(base / "model.safetensors")
    assert torch.equal(fused["extra.position_ids"], torch.arange(8))
    assert torch.equal(fused["classifier.weight"], base_state["classifier.weight"])
    assert not torch.equal(fused["bert.pooler.dense.weight"], base_state["bert.pooler.dense.weight"])
    assert result.copied_tensors == 3


def test_clip_vision_experts_on_a_full_clip_base(tmp_path: Path) -> None:
    """FusionBench's layout: experts are CLIPVisionModel, the base is the whole CLIP model."""
    torch.manual_seed(0)
    full = clip_full()
    full.save_pretrained(tmp_path / "base")
    experts = []
    for i in range(2):
        vision = CLIPVisionModel(full.config.vision_config)
        vision.load_state_dict(full.vision_model.state_dict(), strict=False)
        with torch.no_grad():
            for p in vision.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        vision.save_pretrained(tmp_path / f"ft{i}")
        experts.append(tmp_path / f"ft{i}")
    out = tmp_path / "o"
    hf_fusion.merge(
        models=[str(e) for e in experts],
        base=str(tmp_path / "base"),
        method="task_arithmetic",
        output=out,
        show_progress=False,
    )
    assert AutoConfig.from_pretrained(out).model_type == "clip_vision_model"
    model = CLIPVisionModel.from_pretrained(out)
    fused = load_file(out / "model.safetensors")
    assert not any(k.startswith(("text_model.", "vision_model.", "logit_scale")) for k in fused)
    full_state = load_file(tmp_path / "base" / "model.safetensors")
    base_state = {k: full_state["vision_model." + k] for k in fused}
    expected = ref.task_arithmetic(base_state, [ref.load_state(e) for e in experts], 0.3)
    for k, v in expected.items():
        torch.testing.assert_close(fused[k].double(), v, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert model(**example_inputs("clip_vision")).last_hidden_state.isfinite().all()


def test_only_allow_listed_side_files_travel(tmp_path: Path, bert_pool) -> None:
    """A base folder that also holds code, credentials, keys, notes and a private subfolder: only config,
    tokenizer and sentence-transformers module files reach the output; auto_map, naming code that is not
    copied, leaves the output's config."""
    base, experts = bert_pool
    src = tmp_path / "with_files"
    src.mkdir()
    for f in base.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    config = json.loads((src / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_custom.CustomModel"}
    (src / "config.json").write_text(json.dumps(config))
    (src / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    (src / "tokenizer_config.json").write_text('{"auto_map": {"AutoTokenizer": ["tokenization_custom.T", null]}}')
    (src / "modeling_custom.py").write_text("raise SystemExit")
    (src / "README.md").write_text("the base's card")
    (src / "credentials.json").write_text('{"secret": "s3cr3t"}')
    (src / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----")
    (src / "notes.txt").write_text("internal notes")
    (src / "private").mkdir()
    (src / "private" / "config.json").write_text('{"secret": "s3cr3t"}')
    (src / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "path": "../outside", "type": "x"},
            ]
        )
    )
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (src / "1_Pooling" / "notes.txt").write_text("internal notes")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "config.json").write_text('{"secret": "s3cr3t"}')
    (src / "tokenizer.json").symlink_to(tmp_path / "outside" / "config.json")  # a link is never followed
    out = tmp_path / "o"
    result = hf_fusion.merge(
        models=[str(e) for e in experts], base=str(src), method="ties", output=out, show_progress=False
    )
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert written == {
        "config.json",
        "vocab.txt",
        "tokenizer_config.json",
        "modules.json",
        "1_Pooling/config.json",
        "model.safetensors",
        "fusion_recipe.yaml",
        "README.md",
    }
    assert {"vocab.txt", "tokenizer_config.json", "config.json"} <= set(result.files)
    assert "s3cr3t" not in "".join(p.read_text(errors="ignore") for p in out.rglob("*") if p.is_file())
    fused_config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in fused_config and fused_config["model_type"] == config["model_type"]
    assert json.loads((out / "tokenizer_config.json").read_text()) == {}
    AutoConfig.from_pretrained(out)  # loads without the code auto_map named
    card = (out / "README.md").read_text()
    assert "the base's card" not in card and "hf-fusion" in card  # the output's own card, not the base's


def test_recipe_copy_reproduces_the_merge_bit_for_bit(tmp_path: Path, bert_pool) -> None:
    base, experts = bert_pool
    first = hf_fusion.merge(
        models=[str(e) for e in experts],
        base=str(base),
        method="dare_ties",
        output=tmp_path / "a",
        seed=11,
        show_progress=False,
    )
    recipe = hf_fusion.Recipe.from_yaml(tmp_path / "a" / RECIPE_FILENAME)
    assert recipe.method == "dare_ties_merging" and recipe.parameters["seed"] == 11
    assert recipe.parameters["threshold"] == 20  # defaults are written out, so later default changes do not matter
    hf_fusion.merge(recipe, output=tmp_path / "b", show_progress=False)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert first.statistics_passes >= 2


def test_overwrite_replaces_and_keeps_nothing_old(tmp_path: Path, bert_pool) -> None:
    base, experts = bert_pool
    out = tmp_path / "o"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(hf_fusion.errors.OutputExistsError):
        hf_fusion.merge(models=[str(e) for e in experts], method="simple_average", output=out, show_progress=False)
    assert (out / "stale.txt").read_text() == "old"
    hf_fusion.merge(
        models=[str(e) for e in experts], method="simple_average", output=out, overwrite=True, show_progress=False
    )
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["o"]
