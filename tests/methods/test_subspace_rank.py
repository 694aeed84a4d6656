"""TSV-M, Iso-C and Iso-CTS on low-rank task matrices (LoRA updates): the rank cutoff makes them well-posed."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import torch

from hf_fusion.methods.subspace import iso_c, iso_cts, tsv_merge

METHODS = {
    "tsv_merging": (lambda tvs, tol=None: tsv_merge(tvs, tol), ref.tsv_matrix),
    "iso_c": (lambda tvs, tol=None: iso_c(tvs, tol), ref.iso_c_matrix),
    "iso_cts": (lambda tvs, tol=None: iso_cts(tvs, 0.8, tol), lambda tvs: ref.iso_cts_matrix(tvs, 0.8)),
}


def _low_rank_updates(rank: int, seed: int = 0, shape: tuple[int, int] = (48, 32), n: int = 3) -> torch.Tensor:
    """``n`` task matrices B_t A_t of rank ``rank``, in float32, as LoRA experts give them."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape
    return torch.stack([torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g) for _ in range(n)])


def _perturbed(tvs: torch.Tensor, relative: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return tvs + relative * tvs.abs().max() * torch.randn(tvs.shape, generator=g)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("method", METHODS)
def test_low_rank_merges_are_stable_under_tiny_perturbations(method: str) -> None:
    merge, _ = METHODS[method]
    tvs = _low_rank_updates(rank=3)
    change = _relative(merge(_perturbed(tvs, 1e-7)), merge(tvs))
    assert change < 1e-5, f"{method} moved by {change:.2e} for a 1e-7 perturbation"


@pytest.mark.parametrize("method", ["iso_c", "iso_cts", "tsv_merging"])
def test_without_the_cutoff_the_noise_directions_take_over(method: str) -> None:
    """The case the cutoff exists for: keeping every non-zero singular value makes the result follow rounding."""
    merge, _ = METHODS[method]
    tvs = _low_rank_updates(rank=3)
    change = _relative(merge(_perturbed(tvs, 1e-7), 0.0), merge(tvs, 0.0))
    assert change > 1e-2


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rank", [3, 32])  # low rank, and full rank (32 = min(48, 32))
def test_equal_to_a_float64_reference_with_the_same_cutoff(method: str, rank: int) -> None:
    merge, reference = METHODS[method]
    tvs = _low_rank_updates(rank=rank)
    expected = reference(tvs.double().numpy())
    got = merge(tvs).double().numpy()
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-5


def test_a_tolerance_drops_directions_below_it() -> None:
    """A rank-3 sum whose third direction is 1e-3 of the first: a 1e-2 tolerance keeps two directions."""
    u, _ = torch.linalg.qr(torch.randn(48, 3, generator=torch.Generator().manual_seed(2)))
    v, _ = torch.linalg.qr(torch.randn(32, 3, generator=torch.Generator().manual_seed(3)))
    tvs = (u * torch.tensor([1.0, 0.5, 1e-3])) @ v.T
    kept = torch.linalg.matrix_rank(iso_c(tvs[None], 1e-2), atol=1e-6)
    assert int(kept) == 2 and int(torch.linalg.matrix_rank(iso_c(tvs[None]), atol=1e-6)) == 3


def test_the_recipe_records_the_directions_each_matrix_kept(tmp_path) -> None:  # noqa: ANN001
    """A LoRA-like pool: rank-2 updates of 16 x 12 matrices; Iso-C keeps at most 2 x 3 directions per matrix."""
    from safetensors.torch import save_file

    import hf_fusion
    from hf_fusion.recipe import RECIPE_FILENAME, Recipe

    g = torch.Generator().manual_seed(4)
    base = {"a.weight": torch.randn(16, 12, generator=g), "b.weight": torch.randn(12, 16, generator=g)}
    (tmp_path / "base").mkdir()
    save_file(base, tmp_path / "base" / "model.safetensors")
    experts = []
    for i in range(3):
        moved = {
            k: v + torch.randn(v.shape[0], 2, generator=g) @ torch.randn(2, v.shape[1], generator=g)
            for k, v in base.items()
        }
        (tmp_path / f"ft{i}").mkdir()
        save_file(moved, tmp_path / f"ft{i}" / "model.safetensors")
        experts.append(str(tmp_path / f"ft{i}"))
    hf_fusion.merge(
        models=experts, base=str(tmp_path / "base"), method="iso_c", output=tmp_path / "out", show_progress=False
    )
    text = (tmp_path / "out" / RECIPE_FILENAME).read_text()
    assert "# directions kept above the rank cutoff, per matrix: min 6, median 6, max 6 over 2 matrices" in text
    assert "2 kept fewer than their full rank" in text
    assert Recipe.from_yaml(tmp_path / "out" / RECIPE_FILENAME).method == "iso_c"  # the notes are comments
