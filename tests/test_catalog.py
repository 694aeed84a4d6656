"""The catalog is complete and well-formed, and its ids follow FusionBench's naming."""

from __future__ import annotations

import re

import pytest

from hf_fusion.catalog import PoolError, get_pool, pool_names

FUSIONBENCH_POOLS = {
    f"clip-vit-{arch}_{suite}"
    for arch in ("base-patch32", "base-patch16", "large-patch14")
    for suite in ("TA8", "TALL14", "TALL20")
} | {
    "clip-vit-base-patch16_TA8_lora",
    "flan-t5-base_glue",
    "flan-t5-base_glue_lora16",
    "flan-t5-large_glue_lora16",
    "gpt-2_glue",
    "convnext-base-224_8-tasks",
}
TA8 = ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]


def test_every_fusionbench_pool_is_there() -> None:
    assert FUSIONBENCH_POOLS <= set(pool_names())
    assert "minilm-text3" in pool_names()


@pytest.mark.parametrize("name", sorted(FUSIONBENCH_POOLS | {"minilm-text3"}))
def test_pool_is_well_formed(name: str) -> None:
    pool = get_pool(name)
    assert pool.base and pool.source and pool.description
    assert set(pool.experts) == {t.name for t in pool.tasks}
    for task in pool.tasks:
        assert task.dataset and task.split and task.metric in ("accuracy", "exact_match", "spearmanr")
        if task.kind == "clip_zero_shot":
            assert task.templates and all("{}" in t for t in task.templates)
        if task.kind == "text_to_text":
            fields = set(re.findall(r"{(\w+)}", task.prompt))
            assert fields and fields <= {
                "sentence",
                "premise",
                "hypothesis",
                "sentence1",
                "sentence2",
                "question",
                "question1",
                "question2",
            }
        if task.kind == "classification" and task.task_type == "text-classification":
            assert task.text


def test_ids_follow_fusionbench() -> None:
    for arch, base in (
        ("base-patch32", "openai/clip-vit-base-patch32"),
        ("large-patch14", "openai/clip-vit-large-patch14"),
    ):
        pool = get_pool(f"clip-vit-{arch}_TALL20")
        assert pool.base == base and len(pool.tasks) == 20
        assert [t.name for t in pool.tasks][:8] == TA8
        assert all(pool.experts[t] == f"tanganke/clip-vit-{arch}_{t}" for t in pool.experts)
    lora = get_pool("clip-vit-base-patch16_TA8_lora")
    assert lora.experts["svhn"] == "tanganke/clip-vit-base-patch16_svhn_lora-16"
    flan = get_pool("flan-t5-large_glue_lora16")
    assert flan.base == "google/flan-t5-large" and flan.experts["stsb"] == "tanganke/flan-t5-large_glue-stsb_lora-16"
    assert flan.task("stsb").metric == "spearmanr" and flan.task("mnli").split == "validation_matched"
    gpt2 = get_pool("gpt-2_glue")
    assert gpt2.heads == ["score.*"] and gpt2.experts["qqp"] == "tanganke/gpt2_qqp" and len(gpt2.tasks) == 7
    convnext = get_pool("convnext-base-224_8-tasks")
    assert convnext.experts["dtd"] == "tanganke/convnext-base-224_dtd_sgd_batch-size-64_lr-0.01_steps-4000"
    clip = get_pool("clip-vit-base-patch32_TA8")
    assert clip.task("svhn").dataset == "ufldl-stanford/svhn" and clip.task("svhn").config == "cropped_digits"


def test_unknown_pool_suggests() -> None:
    with pytest.raises(PoolError, match="Did you mean 'clip-vit-base-patch32_TA8'"):
        get_pool("clip-vit-base-patch32_TA9")
