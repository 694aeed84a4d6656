"""Classification with each task's own head: fused backbone + the expert's head, for text and for images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from task_helpers import color_images, perturb, publish_dataset, review_texts
from transformers import (
    BertForSequenceClassification,
    BertModel,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    ViTModel,
)

import hf_fusion
from hf_fusion.tasks.base import EvalSettings


@torch.no_grad()
def direct_text_accuracy(backbone: BertModel, expert: Path, tokenizer, data) -> float:
    model = BertForSequenceClassification.from_pretrained(expert).eval()
    model.bert.load_state_dict(backbone.state_dict())
    batch = tokenizer(list(data["sentence"]), padding=True, return_tensors="pt")
    predicted = model(**batch).logits.argmax(-1)
    return float((predicted == torch.tensor(list(data["label"]))).float().mean())


def test_text_heads(text_pool: Path, tokenizer, tmp_path: Path) -> None:
    result = hf_fusion.merge(
        pool=str(text_pool / "pool.yaml"),
        method="ties_merging",
        output=tmp_path / "fused",
        evaluate=EvalSettings(metrics="bundled", batch_size=5),
        show_progress=False,
    )
    assert BertModel.from_pretrained(tmp_path / "fused") is not None  # the fused backbone is the base architecture
    data = {"reviews_a": review_texts(24, seed=1), "reviews_b": review_texts(24, seed=2)}
    for r, expert in zip(result.evaluation.results, ("ft0", "ft1")):
        backbones = {
            "fused": BertModel.from_pretrained(tmp_path / "fused"),
            "pretrained": BertModel.from_pretrained(text_pool / "base"),
            "individual": BertForSequenceClassification.from_pretrained(text_pool / expert).bert,
        }
        for label, backbone in backbones.items():
            expected = direct_text_accuracy(backbone, text_pool / expert, tokenizer, data[r.task])
            assert r.scores[label] == pytest.approx(expected), (r.task, label)


def test_image_heads(hub, tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        image_size=32,
        patch_size=8,
        num_labels=3,
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(tmp_path / "base")
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path / "base")
    base = ViTModel.from_pretrained(tmp_path / "base")
    for i in range(2):
        expert = ViTForImageClassification(config)
        expert.vit.load_state_dict(base.state_dict(), strict=False)
        perturb(expert, seed=20 + i, scale=0.05).save_pretrained(tmp_path / f"ft{i}")
    publish_dataset(hub, "fusion-lab/colors-heads", color_images(18, seed=3))
    tasks = {
        f"colors{i}": {
            "expert": str(tmp_path / f"ft{i}"),
            "kind": "classification",
            "metric": "accuracy",
            "task_type": "image-classification",
            "dataset": "fusion-lab/colors-heads",
        }
        for i in range(2)
    }
    pool = tmp_path / "pool.yaml"
    pool.write_text(yaml.safe_dump({"base": str(tmp_path / "base"), "heads": ["classifier.*"], "tasks": tasks}))
    result = hf_fusion.merge(
        pool=str(pool),
        method="simple_average",
        output=tmp_path / "fused",
        evaluate=EvalSettings(metrics="bundled"),
        show_progress=False,
    )
    data = color_images(18, seed=3)
    pixels = processor(images=[im.convert("RGB") for im in data["image"]], return_tensors="pt")["pixel_values"]
    fused_backbone = ViTModel.from_pretrained(tmp_path / "fused", add_pooling_layer=False)
    for i, r in enumerate(result.evaluation.results):
        model = ViTForImageClassification.from_pretrained(tmp_path / f"ft{i}").eval()
        model.vit.load_state_dict(fused_backbone.state_dict(), strict=False)
        with torch.no_grad():
            predicted = model(pixel_values=pixels).logits.argmax(-1)
        expected = float((predicted == torch.tensor(list(data["label"]))).float().mean())
        assert r.scores["fused"] == pytest.approx(expected)
