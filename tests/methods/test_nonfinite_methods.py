"""Every data-free tensor-wise method on models that hold NaN or infinities, with ``allow_nonfinite``: no library
traceback (TIES' bincount, the SVDs of TSV and Iso-C, SLERP's division, the Karcher iteration), and the non-finite
values stay where they were: every other output element is finite."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from toy import make_pool

import hf_fusion
from hf_fusion.errors import FusionError
from hf_fusion.registry import DataNeed, MethodKind, all_methods

MATRIX = "bert.encoder.layer.0.attention.self.query.weight"
VECTOR = "bert.encoder.layer.1.output.dense.bias"
TWO_MODEL = {"slerp", "linear_interpolation"}
ONE_MODEL = {"passthrough"}
PARAMS = {"wudi_merging": {"iter_num": 5}}


def _tensor_wise() -> list[str]:
    return [s.name for s in all_methods() if s.data is DataNeed.NONE and s.kind is MethodKind.TENSOR_WISE]


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], dict[str, torch.Tensor]]:
    """A BERT pool whose first expert holds a few NaN and +inf in one matrix and NaN in a whole bias."""
    root = tmp_path_factory.mktemp("poisoned")
    base, experts = make_pool(root, "bert", 2, seed=3)
    weights = load_file(experts[0] / "model.safetensors")
    weights[MATRIX][0, :3] = float("nan")
    weights[MATRIX][5, 7] = float("inf")
    weights[VECTOR][:] = float("nan")
    save_file(weights, experts[0] / "model.safetensors", metadata={"format": "pt"})
    masks = {MATRIX: ~torch.isfinite(weights[MATRIX]), VECTOR: ~torch.isfinite(weights[VECTOR])}
    return base, experts, masks


def _outputs(folder: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(f) for f in sorted(folder.rglob("*.safetensors"))]


@pytest.mark.parametrize("method", [m for m in _tensor_wise() if m not in ONE_MODEL])  # a copy spreads nothing
def test_without_the_flag_the_model_and_tensor_are_named(tmp_path: Path, poisoned, method: str) -> None:
    base, experts, _ = poisoned
    models = experts[:1] if method in TWO_MODEL else experts
    with pytest.raises(FusionError) as err:
        hf_fusion.merge(
            models=[str(m) for m in models],
            base=str(base),
            method=method,
            output=tmp_path / "out",
            show_progress=False,
            **PARAMS.get(method, {}),
        )
    message = str(err.value)
    assert str(experts[0].name) in message and ("NaN" in message or "infinite" in message), message
    assert MATRIX in message or VECTOR in message, message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", _tensor_wise())
def test_with_allow_nonfinite_every_method_keeps_them_in_place(tmp_path: Path, poisoned, method: str) -> None:
    base, experts, masks = poisoned
    models = experts[:1] if method in TWO_MODEL | ONE_MODEL else experts
    result = hf_fusion.merge(
        models=[str(m) for m in models],
        base=str(base),
        method=method,
        output=tmp_path / "out",
        show_progress=False,
        allow_nonfinite=True,
        **PARAMS.get(method, {}),
    )
    outputs = _outputs(result.output)
    assert outputs
    for tensors in outputs:
        for name, value in tensors.items():
            bad = ~torch.isfinite(value)
            if name in masks:
                assert torch.equal(bad, masks[name]), (name, bad.sum(), masks[name].sum())
            else:
                assert not bad.any(), f"{method} made {int(bad.sum())} non-finite values in {name}"
