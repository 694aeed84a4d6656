"""CLIP zero-shot classification: fused vision towers in the pretrained CLIP, scored like a direct computation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from task_helpers import color_images, perturb, publish_dataset
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionModel

import hf_fusion
from hf_fusion.tasks.base import EvalSettings

TEMPLATES = {"colors_a": ["a photo of the color {} ."], "colors_b": ["an image showing {} .", "a picture of {} ."]}


@pytest.fixture(scope="module")
def clip_pool(tmp_path_factory, hub, tokenizer) -> Path:
    root = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=32,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=0,
            projection_dim=16,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            projection_dim=16,
        ),
        projection_dim=16,
    )
    base = CLIPModel(config)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "base")
    for i in range(2):
        vision = CLIPVisionModel(config.vision_config)
        getattr(vision, "vision_model", vision).load_state_dict(base.vision_model.state_dict())
        perturb(vision, seed=i + 1, scale=0.05).save_pretrained(root / f"ft{i}")
    publish_dataset(hub, "fusion-lab/colors", color_images(30, seed=0))
    tasks = {
        name: {
            "expert": str(root / f"ft{i}"),
            "kind": "clip_zero_shot",
            "task_type": "zero-shot-image-classification",
            "metric": "accuracy",
            "dataset": "fusion-lab/colors",
            "split": "test",
            "templates": TEMPLATES[name],
        }
        for i, name in enumerate(TEMPLATES)
    }
    (root / "pool.yaml").write_text(yaml.safe_dump({"name": "tiny-clip", "base": str(root / "base"), "tasks": tasks}))
    return root


@torch.no_grad()
def direct_accuracy(base: Path, vision_folder: Path, templates: list[str], tokenizer, data) -> float:
    """Zero-shot accuracy computed from scratch with transformers' CLIPModel."""
    clip = CLIPModel.from_pretrained(base).eval()
    tower = CLIPVisionModel.from_pretrained(vision_folder) if vision_folder != base else None
    if tower is not None:  # transformers 5's CLIPVisionModel is the vision transformer itself
        clip.vision_model.load_state_dict(getattr(tower, "vision_model", tower).state_dict())
    processor = CLIPImageProcessor.from_pretrained(base)
    classes = []
    for name in data.features["label"].names:
        tokens = tokenizer([t.format(name) for t in templates], padding=True, return_tensors="pt")
        emb = clip.get_text_features(**tokens)
        emb = getattr(emb, "pooler_output", emb)
        emb = emb / emb.norm(dim=-1, keepdim=True)
        classes.append(emb.mean(0) / emb.mean(0).norm())
    text = torch.stack(classes)
    pixels = processor(images=[im.convert("RGB") for im in data["image"]], return_tensors="pt")["pixel_values"]
    image = clip.get_image_features(pixel_values=pixels)
    image = getattr(image, "pooler_output", image)
    image = image / image.norm(dim=-1, keepdim=True)
    predicted = (image @ text.T).argmax(-1)
    return float((predicted == torch.tensor(list(data["label"]))).float().mean())


def test_merge_and_evaluate_clip_pool(clip_pool: Path, tokenizer, tmp_path: Path) -> None:
    result = hf_fusion.merge(
        pool=str(clip_pool / "pool.yaml"),
        method="task_arithmetic",
        output=tmp_path / "fused",
        evaluate=EvalSettings(metrics="bundled", batch_size=8),
        show_progress=False,
    )
    report = result.evaluation
    assert [r.task for r in report.results] == ["colors_a", "colors_b"]
    data = color_images(30, seed=0)
    folders = {"fused": tmp_path / "fused", "pretrained": clip_pool / "base"}
    for r in report.results:
        folders["individual"] = clip_pool / ("ft0" if r.task == "colors_a" else "ft1")
        assert r.metric_source == "bundled" and r.examples == 30
        for label, folder in folders.items():
            expected = direct_accuracy(clip_pool / "base", folder, TEMPLATES[r.task], tokenizer, data)
            assert r.scores[label] == pytest.approx(expected), (r.task, label)
    assert (tmp_path / "fused" / "evaluation.json").is_file()
    assert "## Evaluation" in (tmp_path / "fused" / "README.md").read_text()
