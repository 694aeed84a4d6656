"""TIES details random weights never reach: exact sign cancellations, ties at the threshold, the third pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import reference as ref
import torch
from safetensors.torch import save_file

import hf_fusion
from hf_fusion.methods.operations import disjoint_merge, elected_sign, fill_zero_sign


def test_elect_sign_and_disjoint_merge_by_hand() -> None:
    trimmed = torch.tensor([[1.0, -2.0, 0.0, 3.0], [2.0, 1.0, 0.0, -3.0], [0.0, -1.0, 0.0, 1.0]])
    assert elected_sign(trimmed).tolist() == [1.0, -1.0, 0.0, 1.0]
    sign = fill_zero_sign(elected_sign(trimmed), zero_sign=-1.0)
    assert sign.tolist() == [1.0, -1.0, -1.0, 1.0]  # column sums 3, -2, 0 (-> fallback), 1
    assert disjoint_merge(trimmed, sign, "sum").tolist() == [3.0, -3.0, 0.0, 4.0]
    assert disjoint_merge(trimmed, sign, "mean").tolist() == [1.5, -1.5, 0.0, 2.0]
    assert disjoint_merge(trimmed, sign, "max").tolist() == [2.0, -2.0, 0.0, 3.0]
    zero = torch.zeros(4)  # a zero elected sign selects the negative values, as in the paper's code
    assert disjoint_merge(trimmed, zero, "sum").tolist() == [0.0, -3.0, 0.0, -3.0]
    assert disjoint_merge(trimmed, zero, "max").tolist() == [0.0, 0.0, 0.0, 0.0]


def _crafted_pool(root: Path, negative_majority: bool, seed: int) -> tuple[Path, list[Path]]:
    """Values in {-2..2}; half of one sign is zeroed so the model-wide vote leans the other way."""
    """Integer-valued task vectors: many exact cancellations and many ties at the magnitude threshold."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (40, 30), "b.weight": (64,), "c.bias": (7, 3, 5)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    paths = []
    save_dir = root / "base"
    save_dir.mkdir(parents=True)
    save_file(base, save_dir / "model.safetensors")
    for i in range(3):
        tv = {k: torch.randint(-2, 3, s, generator=g).float() for k, s in shapes.items()}
        lean = (lambda v: v > 0) if negative_majority else (lambda v: v < 0)
        tv = {k: torch.where(lean(v), v * torch.randint(0, 2, v.shape, generator=g), v) for k, v in tv.items()}
        folder = root / f"ft{i}"
        folder.mkdir()
        save_file({k: base[k] + tv[k] for k in shapes}, folder / "model.safetensors")
        paths.append(folder)
    return save_dir, paths


@pytest.mark.parametrize("negative_majority", [False, True])
@pytest.mark.parametrize("scope", ["model", "tensor"])
@pytest.mark.parametrize("merge_func", ["sum", "mean", "max"])
def test_cancellations_and_threshold_ties_match_reference(
    tmp_path: Path, negative_majority: bool, scope: str, merge_func: str
) -> None:
    base, experts = _crafted_pool(tmp_path, negative_majority, seed=int(negative_majority))
    base_sd, expert_sds = ref.load_state(base), [ref.load_state(e) for e in experts]
    tvs = [{k: e[k] - base_sd[k] for k in base_sd} for e in expert_sds]
    zero_sums = sum(int(((sum(tv[k] for tv in tvs) == 0) & (tvs[0][k] != 0)).sum()) for k in base_sd)
    assert zero_sums > 0, "the crafted pool must contain exact cancellations"
    result = hf_fusion.merge(
        models=[str(e) for e in experts],
        base=str(base),
        method="ties_merging",
        output=tmp_path / "out",
        threshold=40,
        merge_func=merge_func,
        threshold_scope=scope,
        scaling_factor=1.0,
        show_progress=False,
        budget_elements=50,
    )
    expected = ref.ties(base_sd, expert_sds, 1.0, 40, merge_func, scope=scope)
    fused = ref.load_state(tmp_path / "out")
    for name, value in expected.items():
        torch.testing.assert_close(fused[name].double(), value, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert result.statistics_passes in (2, 3)


@pytest.mark.parametrize("scope", ["model", "tensor"])
def test_keeping_everything_needs_no_statistics(tmp_path: Path, scope: str) -> None:
    """At a threshold of 100% nothing is ranked or trimmed: the result is the reference's, with no statistics pass
    over the model when the threshold is the model's."""
    base, experts = _crafted_pool(tmp_path, negative_majority=True, seed=3)
    base_sd, expert_sds = ref.load_state(base), [ref.load_state(e) for e in experts]
    result = hf_fusion.merge(
        models=[str(e) for e in experts],
        base=str(base),
        method="ties_merging",
        output=tmp_path / "out",
        threshold=100,
        merge_func="mean",
        threshold_scope=scope,
        scaling_factor=1.0,
        show_progress=False,
        budget_elements=50,
    )
    expected = ref.ties(base_sd, expert_sds, 1.0, 100, "mean", scope=scope)
    fused = ref.load_state(tmp_path / "out")
    for name, value in expected.items():
        torch.testing.assert_close(fused[name].double(), value, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")
    if scope == "model":
        assert result.statistics_passes == 0


def test_two_passes_and_revisits_only_when_the_vote_is_negative(tmp_path: Path, monkeypatch) -> None:
    from hf_fusion.methods.ties_merging import TiesMerging

    revisited: list[set] = []
    original = TiesMerging.revisit

    def spy(self):  # noqa: ANN001, ANN202
        revisited.append(original(self))
        return revisited[-1]

    monkeypatch.setattr(TiesMerging, "revisit", spy)
    for negative in (False, True):
        base, experts = _crafted_pool(tmp_path / str(negative), negative, seed=3)
        result = hf_fusion.merge(
            models=[str(e) for e in experts],
            base=str(base),
            method="ties",
            threshold=40,
            output=tmp_path / f"out{negative}",
            budget_elements=60,
            show_progress=False,
        )
        assert result.statistics_passes == 2
    assert revisited[0] == set()  # provisional +1 was right
    assert len(revisited[1]) > 1  # several slices held exact cancellations and were fused again


def _mergekit_style_ties(base: dict, experts: list[dict], density: float) -> dict:
    """Per-tensor TIES as mergekit defines it, with ties at the threshold kept in flat order (a stable sort)."""
    out = {}
    for name, b in base.items():
        k = max(1, int(density * b.numel()))
        kept = []
        for expert in experts:  # float32 differences, as the engine takes them: the ties are those of float32
            delta = (expert[name].float() - b.float()).double().flatten()
            order = torch.sort(delta.abs(), descending=True, stable=True).indices[:k]
            mask = torch.zeros_like(delta, dtype=torch.bool)
            mask[order] = True
            kept.append(delta * mask)
        stacked = torch.stack(kept)
        majority = torch.where(stacked.sum(0) >= 0, 1.0, -1.0).double()
        agree = torch.sign(stacked) == majority
        divisor = agree.sum(0).double().clamp(min=1)
        out[name] = b.double() + ((stacked * agree).sum(0) / divisor).view(b.shape)
    return out


@pytest.mark.parametrize("budget", [50, 10_000])
def test_exact_keep_count_breaks_threshold_ties_in_flat_order_across_slices(tmp_path: Path, budget: int) -> None:
    base, experts = _crafted_pool(tmp_path, negative_majority=True, seed=5)
    base_sd, expert_sds = ref.load_state(base), [ref.load_state(e) for e in experts]
    delta = (expert_sds[0]["a.weight"] - base_sd["a.weight"]).abs().flatten()
    k = int(0.3 * delta.numel())
    assert int((delta >= delta.sort(descending=True).values[k - 1]).sum()) > k, "the pool must tie at the threshold"
    hf_fusion.merge(
        models=[str(e) for e in experts],
        base=str(base),
        method="ties_merging",
        output=tmp_path / "out",
        threshold=30,
        threshold_scope="tensor",
        keep_count="exact",
        zero_sign="positive",
        merge_func="mean",
        scaling_factor=1.0,
        show_progress=False,
        budget_elements=budget,
    )
    fused = ref.load_state(tmp_path / "out")
    for name, value in _mergekit_style_ties(base_sd, expert_sds, 0.3).items():
        torch.testing.assert_close(fused[name].double(), value, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_an_exact_quantile_over_slices_keeps_exactly_the_count_and_the_first_ties() -> None:
    from hf_fusion.methods.operations import drop_ties
    from hf_fusion.methods.quantile import MagnitudeQuantile

    values = torch.tensor([3.0, 1.0, 2.0, 2.0, 0.5, 2.0, 2.0, 4.0, 2.0, 0.0])  # six 2s tie at the threshold
    slices = [values[:3], values[3:7], values[7:]]
    q = MagnitudeQuantile(0.5, exact=True)  # keep 5: 4, 3 and the first three 2s
    for part in slices:
        q.count("g", part)
    q.end_count("g")
    for part in slices:
        q.refine("g", part)
    assert q.end_refine("g") == 2.0 and q.ties_kept("g") == 3
    seen, kept = 0, []
    for part in slices:
        part = part.clone()
        trimmed = part * (part >= 2.0)
        ties = trimmed == 2.0
        drop_ties(trimmed, ties, keep=q.ties_kept("g") - seen)
        seen += int(ties.sum())
        kept.append(trimmed)
    assert torch.cat(kept).tolist() == [3.0, 0.0, 2.0, 2.0, 0.0, 2.0, 0.0, 4.0, 0.0, 0.0]
    paper = MagnitudeQuantile(0.5)  # kthvalue's rule keeps every tie
    paper.count("g", values)
    paper.end_count("g")
    paper.refine("g", values)
    assert paper.end_refine("g") == 2.0 and paper.ties_kept("g") is None


@pytest.mark.parametrize("keep_count", ["paper", "exact"])
def test_float64_task_vectors_keep_the_count_of_their_float32_ranking(tmp_path: Path, keep_count: str) -> None:
    """With a float64 checkpoint the engine computes in float64; thresholds are float32, and the trim compares the
    same float32 magnitudes the statistics passes ranked (all values equal: every one is a tie)."""
    base = {"w": torch.zeros(50, 20, dtype=torch.float64)}
    (tmp_path / "base").mkdir()
    save_file(base, tmp_path / "base" / "model.safetensors")
    (tmp_path / "ft").mkdir()
    save_file({"w": torch.full((50, 20), -0.37, dtype=torch.float64)}, tmp_path / "ft" / "model.safetensors")
    hf_fusion.merge(
        models=[str(tmp_path / "ft")],
        base=str(tmp_path / "base"),
        method="ties_merging",
        threshold=20,
        threshold_scope="tensor",
        keep_count=keep_count,
        scaling_factor=1.0,
        output=tmp_path / "out",
        show_progress=False,
    )
    kept = int((ref.load_state(tmp_path / "out")["w"] != 0).sum())
    assert kept == (200 if keep_count == "exact" else 1000)  # exact: floor(0.2 x 1000); paper keeps every tie


def test_a_sum_that_overflows_stays_infinite_where_it_is_not_chosen() -> None:
    """The float-mask selection must not turn inf x 0 into NaN: the engine would report NaN from finite inputs."""
    trimmed = torch.tensor([[3e38], [3e38], [-3e38], [-3e38]])
    sign = torch.tensor([1.0])
    merged = disjoint_merge(trimmed, sign, "sum")
    assert merged.tolist() == [float("inf")]
