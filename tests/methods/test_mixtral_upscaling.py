"""MoE from dense decoders: Llama and Mistral experts become a stock MixtralForCausalLM, Qwen2 experts a stock
Qwen2MoeForCausalLM, which transformers alone loads (no hf-fusion code) with each expert's own feed-forward tensors,
the base's other tensors, and routers built as documented."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from toy import decoder_tokenizer, make_pool
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import hf_fusion
from hf_fusion.errors import IncompatibleModelsError, ParameterError, RecipeError
from hf_fusion.registry import get_method

STOCK = {"llama": "MixtralForCausalLM", "mistral": "MixtralForCausalLM", "qwen2": "Qwen2MoeForCausalLM"}
PROMPTS = [["code python function", "bug loop"], ["math sum", "prime number proof"], ["poem rhyme verse"]]
IDS = torch.tensor([[2, 5, 9, 11, 7, 30, 12, 4, 8, 19, 22, 6]])


@pytest.fixture(scope="module")
def decoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[Path], list[Path]]]:
    """Per architecture: a base, three experts (base + noise on every tensor), and three copies of the base."""
    root = tmp_path_factory.mktemp("decoders")
    pools = {}
    for seed, arch in enumerate(STOCK):
        base, experts = make_pool(root, arch, 3, seed=seed)
        copies = []
        for i in range(3):
            copies.append(root / f"{arch}_copy{i}")
            shutil.copytree(base, copies[-1])
        for folder in [base, *experts, *copies]:
            decoder_tokenizer().save_pretrained(folder)
        pools[arch] = (base, experts, copies)
    return pools


def moe(models: list[Path], out: Path, base: Path | None = None, **params) -> Path:
    hf_fusion.merge(
        models=[str(m) for m in models],
        base=str(base) if base else None,
        method="moe",
        output=out,
        show_progress=False,
        **params,
    )
    return out


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def logits(folder: Path) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder).eval()(input_ids=IDS).logits


def expert_name(arch: str, layer: int, expert: int, proj: str) -> str:
    if STOCK[arch] == "MixtralForCausalLM":
        short = {"gate": "w1", "down": "w2", "up": "w3"}[proj]
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{short}.weight"
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}_proj.weight"


def router_name(arch: str, layer: int) -> str:
    block = "block_sparse_moe" if STOCK[arch] == "MixtralForCausalLM" else "mlp"
    return f"model.layers.{layer}.{block}.gate.weight"


LOAD_WITHOUT_HF_FUSION = r"""
import importlib.util, json, sys
from pathlib import Path
sys.path[:] = [p for p in sys.path if not (Path(p or ".") / "hf_fusion").exists()]
sys.meta_path[:] = [f for f in sys.meta_path if "hf_fusion" not in getattr(f, "__module__", "")]
assert importlib.util.find_spec("hf_fusion") is None, "hf_fusion is still importable"
sys.modules["hf_fusion"] = None
import torch
from transformers import AutoModelForCausalLM
model, info = AutoModelForCausalLM.from_pretrained(sys.argv[1], output_loading_info=True)
with torch.no_grad():
    out = model.eval()(input_ids=torch.tensor([json.loads(sys.argv[2])])).logits
print(json.dumps({
    "class": type(model).__name__,
    "info": {k: sorted(map(str, v)) for k, v in info.items()},
    "hf_fusion": sorted(m for m, v in sys.modules.items() if m.startswith("hf_fusion") and v is not None),
    "logits": out.flatten().tolist(),
}))
"""


@pytest.mark.parametrize("arch", list(STOCK))
def test_the_output_loads_with_stock_transformers_alone(decoders, arch: str, tmp_path: Path) -> None:
    base, experts, _ = decoders[arch]
    out = moe(experts, tmp_path / "moe", base, experts_per_token=2)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"TRANSFORMERS_VERBOSITY": "warning"}
    run = subprocess.run(
        [sys.executable, "-I", "-c", LOAD_WITHOUT_HF_FUSION, str(out), json.dumps(IDS[0].tolist())],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["class"] == STOCK[arch] and result["hf_fusion"] == []
    assert result["info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    assert "MISSING" not in run.stderr and "UNEXPECTED" not in run.stderr
    torch.testing.assert_close(torch.tensor(result["logits"]), logits(out).flatten())
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == {"MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe"}[STOCK[arch]]
    assert config["architectures"] == [STOCK[arch]] and config["num_experts_per_tok"] == 2
    assert (out / "README.md").is_file() and (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("arch", list(STOCK))
def test_the_output_is_what_a_stock_save_writes(decoders, arch: str, tmp_path: Path) -> None:
    import transformers

    base, experts, _ = decoders[arch]
    out = moe(experts, tmp_path / "moe", base)
    config = AutoConfig.from_pretrained(out)
    stock = getattr(transformers, STOCK[arch])(config)
    stock.save_pretrained(tmp_path / "stock")
    want = {k: tuple(v.shape) for k, v in tensors(tmp_path / "stock").items()}
    mine = tensors(out)
    assert {k: tuple(v.shape) for k, v in mine.items()} == want
    AutoModelForCausalLM.from_pretrained(out).save_pretrained(tmp_path / "resaved")
    resaved = tensors(tmp_path / "resaved")
    assert resaved.keys() == mine.keys() and all(torch.equal(resaved[k], v) for k, v in mine.items())
    if arch == "qwen2":
        assert config.norm_topk_prob and config.shared_expert_intermediate_size == 1


@pytest.mark.parametrize("arch", list(STOCK))
def test_copies_of_one_model_compute_that_model(decoders, arch: str, tmp_path: Path) -> None:
    """Routing weights sum to 1 (Qwen2-MoE's shared expert is zero), so identical experts give the dense logits."""
    base, _, copies = decoders[arch]
    dense = logits(base)
    torch.testing.assert_close(logits(moe(copies, tmp_path / "copies", base, seed=3)), dense, atol=1e-5, rtol=1e-4)
    upcycled = moe([base], tmp_path / "upcycled", num_experts=4, experts_per_token=3)
    assert len([k for k in tensors(upcycled) if k.startswith("model.layers.0.") and ".experts." in k]) == 12
    torch.testing.assert_close(logits(upcycled), dense, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_experts_are_the_models_feed_forward_and_the_rest_is_the_base(decoders, arch: str, tmp_path: Path) -> None:
    base, experts, _ = decoders[arch]
    got = tensors(moe(experts, tmp_path / "moe", base, seed=5))
    dense = [tensors(e) for e in experts]
    for layer in range(2):
        for j, state in enumerate(dense):
            for proj in ("gate", "up", "down"):
                mine = got[expert_name(arch, layer, j, proj)]
                theirs = state[f"model.layers.{layer}.mlp.{proj}_proj.weight"]
                assert mine.dtype == theirs.dtype and torch.equal(mine.view(torch.uint8), theirs.view(torch.uint8))
        rows = got[router_name(arch, layer)]
        assert rows.shape == (3, 32) and rows.abs().max() > 0
    base_state = tensors(base)
    shared = {k: v for k, v in base_state.items() if ".mlp." not in k}
    assert len(shared) > 10
    for name, tensor in shared.items():
        assert torch.equal(got[name], tensor), name
    if arch == "qwen2":
        assert not got["model.layers.0.mlp.shared_expert.down_proj.weight"].any()


def test_without_a_base_the_other_tensors_are_the_models_mean(decoders, tmp_path: Path) -> None:
    _, experts, _ = decoders["mistral"]
    got = tensors(moe(experts, tmp_path / "moe"))
    dense = [tensors(e) for e in experts]
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight", "model.norm.weight"):
        torch.testing.assert_close(got[name], torch.stack([d[name] for d in dense]).mean(0))
    assert torch.equal(got[expert_name("mistral", 1, 2, "down")], dense[2]["model.layers.1.mlp.down_proj.weight"])


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    return [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_hidden_router_rows_are_the_bases_hidden_states_for_each_experts_prompts(
    decoders, arch: str, tmp_path: Path
) -> None:
    base, experts, _ = decoders[arch]
    got = tensors(moe(experts, tmp_path / "moe", experts[1], router_init="hidden", router_prompts=PROMPTS))
    model = AutoModelForCausalLM.from_pretrained(experts[1]).eval()
    tokenizer = AutoTokenizer.from_pretrained(experts[1])
    for j, prompts in enumerate(PROMPTS):
        per_prompt = []
        for prompt in prompts:
            with torch.no_grad():
                out = model(input_ids=torch.tensor([prompt_ids(tokenizer, prompt)]), output_hidden_states=True)
            per_prompt.append(torch.stack([out.hidden_states[layer][0, -1] for layer in range(2)]))
        mean = torch.stack(per_prompt).mean(0)
        for layer in range(2):
            want = mean[layer] / mean[layer].norm()
            torch.testing.assert_close(got[router_name(arch, layer)][j], want, atol=1e-6, rtol=1e-5)
    assert torch.equal(got["model.norm.weight"], tensors(experts[1])["model.norm.weight"])


def test_cheap_embed_rows_are_the_mean_prompt_embedding(decoders, tmp_path: Path) -> None:
    base, experts, _ = decoders["llama"]
    got = tensors(moe(experts, tmp_path / "moe", base, router_init="cheap_embed", router_prompts=PROMPTS))
    embed = tensors(base)["model.embed_tokens.weight"]
    tokenizer = AutoTokenizer.from_pretrained(base)
    for j, prompts in enumerate(PROMPTS):
        ids = [i for p in prompts for i in prompt_ids(tokenizer, p)]
        mean = embed[ids].mean(0)
        for layer in range(2):
            torch.testing.assert_close(got[router_name("llama", layer)][j], mean / mean.norm())


def test_moe_is_an_alias_with_router_parameters() -> None:
    spec = get_method("moe")
    assert spec.name == "mixtral_upscaling"
    assert {"router_init", "router_prompts"} <= {p.name for p in spec.parameters()}


@pytest.fixture
def no_weights_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any fetch or weight read fails the test: refusals must come before them."""

    def refuse(*args, **kwargs):
        raise AssertionError("weights were fetched or read before the refusal")

    monkeypatch.setattr("hf_fusion.fusion.model_wise.fetch_inputs", refuse)
    monkeypatch.setattr("hf_fusion.engine.checkpoint.SafetensorsCheckpoint.read_rows", refuse)


@pytest.mark.parametrize(
    "params, error, message",
    [
        ({"router_init": "hidden"}, ParameterError, "needs router_prompts"),
        ({"router_init": "hidden", "router_prompts": PROMPTS[:2]}, ParameterError, "2 list"),
        ({"router_init": "cheap_embed", "router_prompts": [["a"], ["a"], ["a"]]}, ParameterError, "same"),
        ({"router_init": "random", "router_prompts": PROMPTS}, ParameterError, "only by"),
        ({"experts_per_token": 4}, ParameterError, "more than the 3 experts"),
    ],
)
def test_bad_parameters_are_refused_before_any_weight(
    decoders, no_weights_read, params: dict, error: type, message: str, tmp_path: Path
) -> None:
    base, experts, _ = decoders["llama"]
    with pytest.raises(error, match=message):
        moe(experts, tmp_path / "moe", base, **params)


def test_prompts_without_a_base_are_refused(decoders, no_weights_read, tmp_path: Path) -> None:
    _, experts, _ = decoders["llama"]
    with pytest.raises(RecipeError, match="pass --base"):
        moe(experts, tmp_path / "moe", router_init="hidden", router_prompts=PROMPTS)


@pytest.mark.parametrize("mix", ["experts", "base"])
def test_models_of_different_architectures_are_refused(decoders, no_weights_read, mix: str, tmp_path: Path) -> None:
    llama_base, llama, _ = decoders["llama"]
    qwen_base, qwen, _ = decoders["qwen2"]
    models, base = ([llama[0], qwen[1], llama[2]], llama_base) if mix == "experts" else (llama, qwen_base)
    with pytest.raises(IncompatibleModelsError, match="qwen2"):
        moe(models, tmp_path / "moe", base)


def test_prompt_routers_need_a_decoder_with_a_stock_moe(bert_pool, no_weights_read, tmp_path: Path) -> None:
    base, experts = bert_pool
    with pytest.raises(ParameterError, match="Llama, Mistral or Qwen2"):
        moe(experts, tmp_path / "moe", base, router_init="hidden", router_prompts=[["a"], ["b"], ["c"]])


def test_the_output_dtype_applies_to_every_tensor_and_the_config(decoders, tmp_path: Path) -> None:
    base, experts, _ = decoders["qwen2"]
    out = moe(experts, tmp_path / "moe", base, dtype="bfloat16")
    assert {t.dtype for t in tensors(out).values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
