"""The subspace, sparsification and alignment methods: one model per task, edge cases, half precision, errors."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import reference as ref
import torch
from toy import example_inputs, make_pool
from transformers import AutoModel

import hf_fusion
from hf_fusion.errors import RecipeError

# method -> (params, reference(base, experts)); every data-free method added with the subspace family
SINGLE: dict[str, tuple[dict[str, Any], Callable[[ref.StateDict, list[ref.StateDict]], ref.StateDict]]] = {
    "tsv_merging": ({}, lambda b, e: ref.tsv(b, e)),
    "iso_c": ({}, lambda b, e: ref.iso_c(b, e)),
    "iso_cts": ({}, lambda b, e: ref.iso_cts(b, e)),
    "wudi_merging": ({"iter_num": 20, "lr": 1e-4}, lambda b, e: ref.wudi(b, e, 20, 1e-4)),
    "magmax": ({}, lambda b, e: ref.magmax(b, e)),
    "breadcrumbs": ({"density": 0.7, "gamma": 0.05}, lambda b, e: ref.breadcrumbs(b, e, 0.3, 0.7, 0.05)),
    "della": ({}, lambda b, e: ref.della(b, e)),
    "karcher_mean": ({}, lambda b, e: ref.karcher(e, b)),
    "consensus_merging": ({"k": 1}, lambda b, e: ref.consensus(b, e, 0.3, 0.6, 1)),
    "model_stock": ({}, ref.model_stock),
}
PER_TASK = {
    "tall_masks": ({"tall_mask_lambda": 0.4}, lambda b, e: ref.tall_masks(b, e, 0.4)),
    "emr_merging": ({}, ref.emr),
}
SVD_LIKE = {"tsv_merging", "iso_c", "iso_cts", "karcher_mean", "wudi_merging"}


def _merge(method: str, base: Path, experts: list[Path], out: Path, **params: Any) -> hf_fusion.MergeResult:
    return hf_fusion.merge(
        models=[str(p) for p in experts], base=str(base), method=method, output=out, show_progress=False, **params
    )


def _assert_matches(folder: Path, expected: ref.StateDict, *, loose: bool) -> None:
    fused = ref.load_state(folder)
    assert set(fused) == set(expected)
    tol = {"rtol": 1e-4, "atol": 2e-5} if loose else {"rtol": 2e-5, "atol": 2e-6}
    for name, value in expected.items():
        assert torch.isfinite(fused[name]).all(), name
        torch.testing.assert_close(fused[name].double(), value, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("method", list(PER_TASK))
def test_one_model_per_task_matches_reference_and_loads(
    method: str, bert_pool: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    base, experts = bert_pool
    params, reference = PER_TASK[method]
    result = _merge(method, base, experts, tmp_path / "out", **params)
    expected = reference(ref.load_state(base), [ref.load_state(p) for p in experts])
    names = [p.name for p in experts]
    assert sorted(result.files) == sorted(["README.md", "fusion_recipe.yaml", *names])
    inputs = example_inputs("bert")
    for name, state in zip(names, expected):
        _assert_matches(tmp_path / "out" / name, state, loose=False)
        model = AutoModel.from_pretrained(tmp_path / "out", subfolder=name).eval()
        reference_model = AutoModel.from_pretrained(tmp_path / "out" / name).eval()
        reference_model.load_state_dict({k.removeprefix("bert."): v.float() for k, v in state.items()}, strict=False)
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).last_hidden_state, reference_model(**inputs).last_hidden_state)
    card = (tmp_path / "out" / "README.md").read_text()
    assert f'subfolder="{names[0]}"' in card and all(f"`{n}`" in card for n in names)


def test_per_task_models_differ_where_tasks_disagree(bert_pool: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, experts = bert_pool
    _merge("emr_merging", base, experts, tmp_path / "emr")
    first, second = (ref.load_state(tmp_path / "emr" / p.name) for p in experts[:2])
    assert any(not torch.equal(first[k], second[k]) for k in first)


@pytest.fixture(scope="module")
def zero_pool(bert_pool: tuple[Path, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The experts with one replaced by a copy of the base: a zero task vector."""
    base, experts = bert_pool
    zero = tmp_path_factory.mktemp("zero") / "unchanged"
    shutil.copytree(base, zero)
    return [zero, *experts[:2]]


@pytest.mark.parametrize("method", list(SINGLE) + list(PER_TASK))
def test_zero_task_vector(
    method: str, bert_pool: tuple[Path, list[Path]], zero_pool: list[Path], tmp_path: Path
) -> None:
    base, _ = bert_pool
    params, reference = {**SINGLE, **PER_TASK}[method]
    _merge(method, base, zero_pool, tmp_path / "out", **params)
    expected = reference(ref.load_state(base), [ref.load_state(p) for p in zero_pool])
    if method in PER_TASK:
        for path, state in zip(zero_pool, expected):
            _assert_matches(tmp_path / "out" / path.name, state, loose=False)
        base_state = ref.load_state(base)
        unchanged = ref.load_state(tmp_path / "out" / zero_pool[0].name)
        assert all(torch.equal(unchanged[k], base_state[k]) for k in unchanged)  # its own model is the base
    else:
        _assert_matches(tmp_path / "out", expected, loose=method in SVD_LIKE)


@pytest.mark.parametrize("method", [m for m in list(SINGLE) + list(PER_TASK) if m != "model_stock"])
def test_one_expert(method: str, bert_pool: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """With one model, every method has a defined answer (most return the model itself)."""
    base, experts = bert_pool
    params, reference = {**SINGLE, **PER_TASK}[method]
    _merge(method, base, experts[:1], tmp_path / "out", **params)
    expected = reference(ref.load_state(base), [ref.load_state(experts[0])])
    folder = tmp_path / "out" / experts[0].name if method in PER_TASK else tmp_path / "out"
    _assert_matches(folder, expected[0] if method in PER_TASK else expected, loose=method in SVD_LIKE)
    if method in ("tsv_merging", "magmax", "tall_masks", "emr_merging"):
        fused, model = ref.load_state(folder), ref.load_state(experts[0])
        scale = 0.5 if method == "magmax" else 1.0
        base_state = ref.load_state(base)
        for k in fused:
            want = base_state[k].double() + scale * (model[k].double() - base_state[k].double())
            torch.testing.assert_close(fused[k].double(), want, rtol=1e-4, atol=2e-5)


@pytest.fixture(scope="module", params=[torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def half_pool(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return make_pool(tmp_path_factory.mktemp("half"), "bert", 3, seed=4, dtype=request.param)


@pytest.mark.parametrize("method", list(SINGLE) + ["emr_merging"])
def test_half_precision_inputs(method: str, half_pool: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """fp16 / bf16 checkpoints are computed in float32 and written back in their dtype."""
    base, experts = half_pool
    params, reference = {**SINGLE, **PER_TASK}[method]
    _merge(method, base, experts, tmp_path / "out", **params)
    expected = reference(ref.load_state(base), [ref.load_state(p) for p in experts])
    folder = tmp_path / "out" / experts[0].name if method in PER_TASK else tmp_path / "out"
    expected = expected[0] if method in PER_TASK else expected
    fused = ref.load_state(folder)
    dtype = next(iter(ref.load_state(base).values())).dtype
    for name, value in expected.items():
        assert fused[name].dtype == dtype
        torch.testing.assert_close(fused[name], value.to(dtype), msg=lambda m: f"{name}: {m}")


def test_pool_errors_come_before_any_work(bert_pool: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, experts = bert_pool
    with pytest.raises(RecipeError, match="at least 2"):
        _merge("model_stock", base, experts[:1], tmp_path / "a")
    with pytest.raises(RecipeError, match="k=3"):
        _merge("consensus_merging", base, experts[:2], tmp_path / "b", k=3)
    with pytest.raises(RecipeError, match="epsilon"):
        _merge("della", base, experts, tmp_path / "c", density=0.95, epsilon=0.1)
    with pytest.raises(RecipeError, match="base"):
        hf_fusion.merge(models=[str(p) for p in experts], method="tsv_merging", output=tmp_path / "d")
    assert not any(tmp_path.iterdir())


def test_della_is_reproducible_under_any_slicing(bert_pool: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """Row slices (a tiny budget) give the same bits as whole tensors: the keep draws are keyed by element."""
    base, experts = bert_pool
    _merge("della", base, experts, tmp_path / "whole", seed=3)
    hf_fusion.merge(
        models=[str(p) for p in experts],
        base=str(base),
        method="della",
        output=tmp_path / "rows",
        show_progress=False,
        seed=3,
        budget_elements=96,
    )
    whole, rows = ref.load_state(tmp_path / "whole"), ref.load_state(tmp_path / "rows")
    assert all(torch.equal(whole[k], rows[k]) for k in whole)


def test_task_arithmetic_leaves_entries_no_expert_changed_bit_identical(tmp_path: Path) -> None:
    """Rows no fine-tune touched (embeddings of unseen tokens) stay the base's bits: differences are taken first."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {"emb.weight": torch.randn(64, 16, generator=g) * 3.0, "lin.weight": torch.randn(8, 8, generator=g)}
    (tmp_path / "base").mkdir()
    save_file(base, tmp_path / "base" / "model.safetensors")
    experts = []
    for i in range(3):  # three: 3 x theta_0 is not exact in float32, so sum - n * base would move untouched entries
        state = {k: v.clone() for k, v in base.items()}
        state["emb.weight"][i * 4 : i * 4 + 4] += torch.randn(4, 16, generator=g) * 1e-3  # a few rows each
        state["lin.weight"] += torch.randn(8, 8, generator=g) * 1e-3
        folder = tmp_path / f"ft{i}"
        folder.mkdir()
        save_file(state, folder / "model.safetensors")
        experts.append(str(folder))
    for weights in (None, [0.5, 1.0, 2.0]):
        out = tmp_path / f"out-{weights is None}"
        extra = {} if weights is None else {"weights": weights}
        hf_fusion.merge(
            models=experts,
            base=str(tmp_path / "base"),
            method="task_arithmetic",
            scaling_factor=0.7,
            output=out,
            show_progress=False,
            **extra,
        )
        fused = ref.load_state(out)
        assert torch.equal(fused["emb.weight"][16:], base["emb.weight"][16:])  # rows 16-63: no expert changed them
        assert not torch.equal(fused["emb.weight"][:16], base["emb.weight"][:16])
