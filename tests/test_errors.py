"""Bad input fails early with a message naming the culprit, and nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from toy import make_pool

import hf_fusion
from hf_fusion.engine import checkpoint as checkpoint_module
from hf_fusion.errors import (
    CheckpointError,
    IncompatibleModelsError,
    OutputExistsError,
    ParameterError,
    PickleCheckpointError,
    RecipeError,
    UnknownMethodError,
)


@pytest.fixture
def no_tensor_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails the test if any tensor data is read: these errors must come from headers and configs alone."""

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("tensor data was read before the error")

    monkeypatch.setattr(checkpoint_module.SafetensorsCheckpoint, "read_rows", refuse)


def _merge(tmp_path: Path, **kwargs):  # noqa: ANN003
    kwargs.setdefault("output", tmp_path / "out")
    kwargs.setdefault("show_progress", False)
    return hf_fusion.merge(**kwargs)


def _assert_nothing_written(tmp_path: Path) -> None:
    leftovers = [p.name for p in tmp_path.iterdir() if p.name == "out" or p.name.startswith(".hf-fusion")]
    assert leftovers == []


CASES = {
    "unknown method": (
        dict(method="tie_merging"),
        UnknownMethodError,
        r"unknown method 'tie_merging'\. Did you mean 'ties_merging'",
    ),
    "unknown parameter": (
        dict(method="ties", scaling=0.3),
        ParameterError,
        r"unknown parameter 'scaling'.*Did you mean 'scaling_factor'",
    ),
    "out of range": (
        dict(method="ties", threshold=150),
        ParameterError,
        r"threshold: Input should be less than or equal to 100",
    ),
    "wrong type": (dict(method="ties", merge_func="median"), ParameterError, r"merge_func"),
    "sparsity of one": (dict(method="dare_ties", sparsity_ratio=1.0), ParameterError, r"sparsity_ratio"),
    "missing base": (dict(method="task_arithmetic", base=None), RecipeError, r"needs a base .*--base"),
    "weights per model": (dict(method="weighted_average", weights=[1, 2]), RecipeError, r"2 weight\(s\) for 3 model"),
    "two-model method": (dict(method="slerp"), RecipeError, r"exactly two models"),
    "bad device": (dict(method="ties", device="tpu"), RecipeError, r"device"),
    "no output": (dict(method="ties", output=None), RecipeError, r"no output folder"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_recipe_errors(case: str, tmp_path: Path, bert_pool, no_tensor_reads) -> None:
    base, experts = bert_pool
    kwargs, error, message = CASES[case]
    args = dict(models=[str(e) for e in experts], base=str(base))
    args.update(kwargs)
    with pytest.raises(error, match=message):
        _merge(tmp_path, **args)
    _assert_nothing_written(tmp_path)


def test_different_architectures_are_named(tmp_path: Path, pools, no_tensor_reads) -> None:
    bert_base, bert_experts = pools["bert"]
    _, gpt2_experts = pools["gpt2"]
    with pytest.raises(
        IncompatibleModelsError,
        match=r"different architectures: .*bert_ft0 is BertForSequenceClassification \(bert\), .*gpt2_ft0 is GPT2LMHeadModel \(gpt2\)",
    ):
        _merge(tmp_path, models=[str(bert_experts[0]), str(gpt2_experts[0])], base=str(bert_base), method="ties")
    _assert_nothing_written(tmp_path)


def test_different_shapes_name_model_and_tensor(tmp_path: Path, no_tensor_reads) -> None:
    base, experts = make_pool(tmp_path / "a", "bert", 2)
    from toy import bert

    torch.manual_seed(0)
    bert(num_labels=5).save_pretrained(tmp_path / "five_labels")
    with pytest.raises(
        IncompatibleModelsError,
        match=r"tensor 'classifier\.(bias|weight)' has shape \[5.*\] in .*five_labels but \[3.*\]",
    ):
        _merge(tmp_path, models=[str(experts[0]), str(tmp_path / "five_labels")], base=str(base), method="ties")
    _assert_nothing_written(tmp_path)


def test_missing_tensor_is_named(tmp_path: Path, bert_pool) -> None:
    base, experts = bert_pool
    broken = tmp_path / "broken"
    broken.mkdir()
    state = load_file(experts[1] / "model.safetensors")
    del state["bert.pooler.dense.bias"]
    save_file(state, broken / "model.safetensors")
    with pytest.raises(IncompatibleModelsError, match=r"broken has no tensor 'bert\.pooler\.dense\.bias'"):
        _merge(tmp_path, models=[str(experts[0]), str(broken)], base=str(base), method="task_arithmetic")
    _assert_nothing_written(tmp_path)


def test_base_of_another_model_is_refused(tmp_path: Path, pools) -> None:
    _, bert_experts = pools["bert"]
    clip_base, _ = pools["clip_vision"]
    with pytest.raises(IncompatibleModelsError, match=r"the base .*clip_vision_base has no tensor"):
        _merge(tmp_path, models=[str(e) for e in bert_experts], base=str(clip_base), method="task_arithmetic")
    _assert_nothing_written(tmp_path)


def test_truncated_weights(tmp_path: Path, bert_pool) -> None:
    base, experts = bert_pool
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "config.json").write_bytes((experts[0] / "config.json").read_bytes())
    data = (experts[0] / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut/model\.safetensors: file is truncated"):
        _merge(tmp_path, models=[str(cut), str(experts[1])], base=str(base), method="ties")
    _assert_nothing_written(tmp_path)


def test_pickle_needs_opt_in(tmp_path: Path, bert_pool) -> None:
    base, experts = bert_pool
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_bytes((experts[0] / "config.json").read_bytes())
    torch.save(load_file(experts[0] / "model.safetensors"), pickled / "pytorch_model.bin")
    args = dict(models=[str(pickled), str(experts[1])], base=str(base), method="task_arithmetic")
    with pytest.raises(
        PickleCheckpointError, match=r"pickled: weights are a pickle \(pytorch_model\.bin\).*--allow-pickle"
    ):
        _merge(tmp_path, **args)
    _assert_nothing_written(tmp_path)
    _merge(tmp_path, allow_pickle=True, **args)
    reference = hf_fusion.merge(
        models=[str(experts[0]), str(experts[1])],
        base=str(base),
        method="task_arithmetic",
        output=tmp_path / "from_safetensors",
        show_progress=False,
    )
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (
        reference.output / "model.safetensors"
    ).read_bytes()


def test_existing_output_is_kept(tmp_path: Path, bert_pool, no_tensor_reads) -> None:
    base, experts = bert_pool
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        _merge(tmp_path, models=[str(e) for e in experts], base=str(base), method="ties")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_missing_local_model(tmp_path: Path, bert_pool, no_tensor_reads) -> None:
    base, experts = bert_pool
    with pytest.raises(RecipeError, match=r"model \./nope not found"):
        _merge(tmp_path, models=[str(experts[0]), "./nope"], base=str(base), method="ties")
    _assert_nothing_written(tmp_path)


def test_crash_mid_merge_leaves_no_output(tmp_path: Path, bert_pool, monkeypatch: pytest.MonkeyPatch) -> None:
    from hf_fusion.methods.task_arithmetic import TaskArithmetic

    calls = {"n": 0}
    original = TaskArithmetic.merge

    def crash_after_a_few(self, inputs):  # noqa: ANN001
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, inputs)

    monkeypatch.setattr(TaskArithmetic, "merge", crash_after_a_few)
    base, experts = bert_pool
    with pytest.raises(KeyboardInterrupt):
        _merge(tmp_path, models=[str(e) for e in experts], base=str(base), method="task_arithmetic")
    assert calls["n"] == 5
    _assert_nothing_written(tmp_path)


@pytest.mark.parametrize("which", ["model", "parent of a model"])
def test_output_cannot_replace_an_input(tmp_path: Path, which: str, no_tensor_reads) -> None:
    base, experts = make_pool(tmp_path / "pool", "bert", 2)
    target = experts[0] if which == "model" else tmp_path / "pool"
    with pytest.raises(RecipeError, match="would replace the input model"):
        hf_fusion.merge(
            models=[str(e) for e in experts],
            base=str(base),
            method="ties",
            output=target,
            overwrite=True,
            show_progress=False,
        )
    assert (experts[0] / "model.safetensors").is_file()


def test_whole_tensor_method_that_cannot_fit_is_refused_from_headers(tmp_path: Path) -> None:
    from hf_fusion.engine.checkpoint import TensorEntry
    from hf_fusion.errors import InsufficientResourcesError
    from hf_fusion.fusion.tensor_wise import check_memory
    from hf_fusion.hub.resolve import HeaderCheckpoint

    huge = TensorEntry("embed.weight", "F32", (1 << 20, 1 << 18), Path("model.safetensors"), 0, 4 << 38)
    headers = [HeaderCheckpoint(f"m{i}", {huge.name: huge}, []) for i in range(2)]
    with pytest.raises(InsufficientResourcesError, match="processes whole tensors"):
        check_memory(headers, elementwise=False, budget_elements=1 << 23)
    check_memory(headers, elementwise=True, budget_elements=1 << 23)  # slices: independent of tensor size


def test_heads_of_different_tasks_get_a_hint(tmp_path: Path, no_tensor_reads) -> None:
    """The built-in experts' classifiers have 5, 3 and 2 classes: named without --heads, the error says how."""
    with pytest.raises(IncompatibleModelsError, match=r"per-task head: .* --heads 'classifier\.\*'"):
        _merge(
            tmp_path,
            models=["builtin:minilm-text3/bbc_news", "builtin:minilm-text3/sms_spam"],
            base="builtin:all-MiniLM-L6-v2",
            method="task_arithmetic",
        )
    assert not (tmp_path / "out").exists()
