"""NaN and infinities in the weights, and results that overflow their dtype: refused with the model and tensor
named, carried through with ``allow_nonfinite``, clamped with ``clamp_overflow``; never a library traceback."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from toy import make_pool

import hf_fusion
from hf_fusion.cli import main
from hf_fusion.errors import NonFiniteError

TENSOR = "transformer.h.0.attn.c_attn.weight"
MASK = "transformer.h.0.attn.bias"
BAD = [(0, 0), (3, 5), (7, 11)]


def _edit(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _copy_pool(src: tuple[Path, list[Path]], dest: Path) -> tuple[Path, list[Path]]:
    base, experts = src
    copies = []
    for folder in [base, *experts]:
        shutil.copytree(folder, dest / folder.name)
        copies.append(dest / folder.name)
    return copies[0], copies[1:]


def _poison(value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        for row, col in BAD:
            tensors[TENSOR][row, col] = value

    return change


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return make_pool(tmp_path_factory.mktemp("gpt2"), "gpt2", 2, seed=3)


@pytest.fixture(scope="module")
def nan_pool(gpt2: tuple[Path, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """The GPT-2 pool with a few NaNs in one tensor of the second model."""
    base, experts = _copy_pool(gpt2, tmp_path_factory.mktemp("nan"))
    _edit(experts[1], _poison(math.nan))
    return base, experts


# method -> (parameters, with the base?) ; slerp takes two models and no base here
METHODS: dict[str, tuple[dict[str, Any], bool]] = {
    "task_arithmetic": ({"scaling_factor": 0.5}, True),
    "ties_merging": ({}, True),
    "tsv_merging": ({}, True),
    "iso_c": ({}, True),
    "slerp": ({}, False),
    "karcher_mean": ({}, True),
    "weighted_average": ({}, False),
}


def _merge(pool: tuple[Path, list[Path]], method: str, out: Path, **kwargs: Any) -> hf_fusion.MergeResult:
    base, experts = pool
    params, with_base = METHODS.get(method, ({}, True))
    return hf_fusion.merge(
        models=[str(e) for e in experts],
        base=str(base) if with_base else None,
        method=method,
        output=out,
        show_progress=False,
        **params,
        **kwargs,
    )


@pytest.mark.parametrize("method", list(METHODS))
def test_nan_in_one_input_is_refused_with_model_and_tensor_named(nan_pool, tmp_path: Path, method: str) -> None:
    with pytest.raises(NonFiniteError) as err:
        _merge(nan_pool, method, tmp_path / "out")
    message = str(err.value)
    assert TENSOR in message and nan_pool[1][1].name in message and "NaN" in message
    assert "--allow-nonfinite" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", list(METHODS))
def test_allow_nonfinite_carries_nan_through_at_its_places_only(nan_pool, tmp_path: Path, method: str) -> None:
    _merge(nan_pool, method, tmp_path / "a", allow_nonfinite=True)
    _merge(nan_pool, method, tmp_path / "b", allow_nonfinite=True)
    out = load_file(tmp_path / "a" / "model.safetensors")
    again = load_file(tmp_path / "b" / "model.safetensors")
    expected = torch.zeros_like(out[TENSOR], dtype=torch.bool)
    for row, col in BAD:
        expected[row, col] = True
    assert torch.equal(torch.isnan(out[TENSOR]), expected)
    assert all(bool(torch.isfinite(t).all()) for name, t in out.items() if name != TENSOR)
    assert all(torch.equal(out[n].nan_to_num(), again[n].nan_to_num()) for n in out)  # deterministic


def test_allow_nonfinite_is_recorded_in_the_recipe(nan_pool, tmp_path: Path) -> None:
    result = _merge(nan_pool, "task_arithmetic", tmp_path / "out", allow_nonfinite=True)
    assert result.recipe.allow_nonfinite
    assert "allow_nonfinite: true" in (tmp_path / "out" / "fusion_recipe.yaml").read_text()


def test_infinities_of_both_signs_become_nan_and_one_sign_stays(gpt2, tmp_path: Path) -> None:
    base, experts = _copy_pool(gpt2, tmp_path / "pool")
    _edit(experts[0], _poison(math.inf))
    _edit(experts[1], lambda t: t[TENSOR].__setitem__((0, 0), -math.inf))
    _merge((base, experts), "task_arithmetic", tmp_path / "out", allow_nonfinite=True)
    fused = load_file(tmp_path / "out" / "model.safetensors")[TENSOR]
    assert math.isnan(fused[0, 0]) and fused[3, 5] == math.inf and fused[7, 11] == math.inf


def test_a_mask_identical_in_every_input_passes_through(gpt2, tmp_path: Path) -> None:
    """A stored causal mask (-inf above the diagonal) is the same in every model: copied as it is, no error."""
    base, experts = _copy_pool(gpt2, tmp_path / "pool")
    mask = torch.full((1, 1, 16, 16), -math.inf).triu(1)

    def add_mask(tensors: dict[str, torch.Tensor]) -> None:
        tensors[MASK] = mask.clone()

    for folder in [base, *experts]:
        _edit(folder, add_mask)
    for method in ("task_arithmetic", "ties_merging", "karcher_mean"):
        _merge((base, experts), method, tmp_path / method)
        written = load_file(tmp_path / method / "model.safetensors")
        assert torch.equal(written[MASK], mask), method


def test_a_mask_that_differs_between_inputs_is_refused(gpt2, tmp_path: Path) -> None:
    base, experts = _copy_pool(gpt2, tmp_path / "pool")
    for i, folder in enumerate([base, *experts]):
        _edit(folder, lambda t, i=i: t.__setitem__(MASK, torch.full((1, 1, 4, 4), -math.inf).triu(1 + i)))
    with pytest.raises(NonFiniteError, match=MASK.replace(".", r"\.")):
        _merge((base, experts), "task_arithmetic", tmp_path / "out")


def test_weights_that_overflow_float32_are_refused_then_clamped(gpt2, tmp_path: Path) -> None:
    _, experts = gpt2
    kwargs = dict(
        models=[str(e) for e in experts],
        method="weighted_average",
        weights=[1e300, 1.0],
        normalize=False,
        show_progress=False,
    )
    with pytest.raises(NonFiniteError, match="overflows float32") as err:
        hf_fusion.merge(output=tmp_path / "out", **kwargs)
    assert "transformer." in str(err.value) and "--clamp-overflow" in str(err.value)
    assert not (tmp_path / "out").exists()
    hf_fusion.merge(output=tmp_path / "clamped", clamp_overflow=True, **kwargs)
    fused = load_file(tmp_path / "clamped" / "model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in fused.values())
    assert fused[TENSOR].abs().max() == torch.finfo(torch.float32).max


def test_large_normalised_weights_do_not_overflow(gpt2, tmp_path: Path) -> None:
    _, experts = gpt2
    hf_fusion.merge(
        models=[str(e) for e in experts],
        method="weighted_average",
        weights=[1e300, 1e300],
        output=tmp_path / "out",
        show_progress=False,
    )
    fused = load_file(tmp_path / "out" / "model.safetensors")
    a, b = (load_file(e / "model.safetensors") for e in experts)
    assert torch.allclose(fused[TENSOR], (a[TENSOR] + b[TENSOR]) / 2)


@pytest.fixture(scope="module")
def fp16_pool(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """Half-precision models whose task vectors on one tensor add up beyond float16's 65504."""
    base, experts = make_pool(tmp_path_factory.mktemp("fp16"), "gpt2", 3, seed=5, dtype=torch.float16)
    _edit(base, lambda t: t[TENSOR].fill_(30000.0))
    for folder in experts:
        _edit(folder, lambda t: t[TENSOR].fill_(60000.0))
    return base, experts


def test_fp16_task_arithmetic_that_overflows_is_refused_then_clamped(fp16_pool, tmp_path: Path) -> None:
    base, experts = fp16_pool
    kwargs = dict(
        models=[str(e) for e in experts],
        base=str(base),
        method="task_arithmetic",
        scaling_factor=1.0,
        show_progress=False,
    )
    with pytest.raises(NonFiniteError, match=rf"{TENSOR.replace('.', '[.]')}.*overflows float16"):
        hf_fusion.merge(output=tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
    hf_fusion.merge(output=tmp_path / "clamped", clamp_overflow=True, **kwargs)
    fused = load_file(tmp_path / "clamped" / "model.safetensors")[TENSOR]
    assert fused.dtype == torch.float16 and bool((fused == 65504.0).all())


def test_cli_reports_a_nan_input_as_an_error_line(nan_pool, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base, experts = nan_pool
    code = main(
        [
            "merge",
            "--repo-ids",
            *map(str, experts),
            "--base",
            str(base),
            "--method",
            "ties_merging",
            "--output",
            str(tmp_path / "out"),
            "-q",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("hf-fusion: error: ") and TENSOR in err and "Traceback" not in err
    code = main(
        [
            "merge",
            "--repo-ids",
            *map(str, experts),
            "--base",
            str(base),
            "--method",
            "ties_merging",
            "--output",
            str(tmp_path / "out"),
            "-q",
            "--allow-nonfinite",
        ]
    )
    assert code == 0 and (tmp_path / "out" / "model.safetensors").exists()


def test_the_fast_finite_check_agrees_with_the_element_check() -> None:
    from hf_fusion.engine.stream import _all_finite

    big = torch.finfo(torch.float32).max
    cases = [
        torch.randn(1000),
        torch.tensor([big, big, -big]),  # finite, but the sum overflows: the element check decides
        torch.tensor([1.0, float("nan")]),
        torch.tensor([float("inf"), 2.0]),
        torch.tensor([float("inf"), float("-inf")]),
        torch.tensor([1.0, float("-inf")], dtype=torch.bfloat16),
        torch.tensor([torch.finfo(torch.bfloat16).max] * 4, dtype=torch.bfloat16),
        torch.tensor([1e300, 1e300], dtype=torch.float64),
        torch.tensor([], dtype=torch.float32),
    ]
    for values in cases:
        assert _all_finite(values) == bool(torch.isfinite(values).all()), values
    assert _all_finite(torch.tensor([1, 2, 3]))


def test_freed_memory_is_kept_on_glibc() -> None:
    import platform

    from hf_fusion.allocator import keep_freed_memory

    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is expected
