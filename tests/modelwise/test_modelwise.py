"""Model-wise methods end to end on a tiny pool: each runs through `merge`, saves, reloads with `from_pretrained`
giving the same outputs, and its core computation matches an independent one written here from the papers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from modelwise_tasks import TASKS
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer, BertForSequenceClassification, BertModel

import hf_fusion
import hf_fusion.models  # noqa: F401  (registers the fused architectures with the Auto classes)
from hf_fusion.catalog import get_pool
from hf_fusion.errors import FusionError, ParameterError, RecipeError
from hf_fusion.models import FusedEnsembleModel, FusedUpscaledModel
from hf_fusion.tasks.base import EvalSettings
from hf_fusion.tasks.data import load_examples


def fuse(pool: Path, method: str, out: Path, **params):
    return hf_fusion.merge(pool=str(pool / "pool.yaml"), method=method, output=out, show_progress=False, **params)


def batch(pool: Path, texts=("good movie review", "bad plot", "great film is it positive")) -> dict[str, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(pool / "base")
    return dict(tokenizer(list(texts), padding=True, return_tensors="pt"))


def backbone(folder: Path) -> BertModel:
    return BertModel.from_pretrained(folder).eval()


def expert_backbones(pool: Path) -> list[BertModel]:
    return [BertForSequenceClassification.from_pretrained(pool / t).bert.eval() for t in TASKS]


def base_and_task_vectors(pool: Path) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    base = {k: v.double() for k, v in backbone(pool / "base").state_dict().items()}
    vectors = [{k: v.double() - base[k] for k, v in m.state_dict().items()} for m in expert_backbones(pool)]
    return base, vectors


def assert_same_outputs(a: torch.nn.Module, b: torch.nn.Module, inputs: dict[str, torch.Tensor], atol=1e-5) -> None:
    with torch.no_grad():
        out_a, out_b = a(**inputs), b(**inputs)
    torch.testing.assert_close(out_a.last_hidden_state, out_b.last_hidden_state, atol=atol, rtol=1e-4)
    torch.testing.assert_close(out_a.pooler_output, out_b.pooler_output, atol=atol, rtol=1e-4)


def calibration_inputs(pool: Path, task: str, n: int) -> dict[str, torch.Tensor]:
    spec = get_pool(str(pool / "pool.yaml")).task(task)
    data = load_examples(spec.model_copy(update={"split": "train"}), n)
    tokenizer = (
        AutoTokenizer.from_pretrained(pool / task)
        if (pool / task / "tokenizer.json").exists()
        else AutoTokenizer.from_pretrained(pool / "base")
    )
    return dict(tokenizer(list(data["sentence"]), padding=True, truncation=True, max_length=256, return_tensors="pt"))


# --- ensembles -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,params",
    [("simple_ensemble", {}), ("weighted_ensemble", {"weights": [1.0, 2.0, 5.0]}), ("max_model_predictor", {})],
)
def test_ensembles_combine_the_members_outputs(cls_pool: Path, tmp_path: Path, method: str, params: dict) -> None:
    fuse(cls_pool, method, tmp_path / "e", **params)
    fused = AutoModel.from_pretrained(tmp_path / "e")
    assert isinstance(fused, FusedEnsembleModel) and len(fused.members) == 3
    inputs = batch(cls_pool)
    with torch.no_grad():
        outs = [m(**inputs) for m in expert_backbones(cls_pool)]
        got = fused(**inputs)
    for field in ("last_hidden_state", "pooler_output"):
        stacked = torch.stack([o[field] for o in outs])
        if method == "simple_ensemble":
            want = stacked.mean(0)
        elif method == "weighted_ensemble":
            want = sum(w / 8.0 * s for w, s in zip(params["weights"], stacked))
        else:
            want = stacked.max(0).values
        torch.testing.assert_close(got[field], want, atol=1e-6, rtol=1e-5)


def test_an_ensemble_of_language_models_keeps_their_tied_heads(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0)
    members = [GPT2LMHeadModel(config).eval() for _ in range(2)]  # never saved: no 'architectures' in the config
    tokens = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        expected = (members[0](tokens).logits + members[1](tokens).logits) / 2
    FusedEnsembleModel.from_members(members).save_pretrained(tmp_path / "ens")
    reloaded = AutoModel.from_pretrained(tmp_path / "ens").eval()
    head, embeddings = reloaded.members[1].lm_head.weight, reloaded.members[1].transformer.wte.weight
    assert head.data_ptr() == embeddings.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=tokens).logits, expected)


def test_weighted_ensemble_checks_the_weights_before_any_work(cls_pool: Path, tmp_path: Path) -> None:
    with pytest.raises(ParameterError, match="2 weights for 3 models"):
        fuse(cls_pool, "weighted_ensemble", tmp_path / "e", weights=[1.0, 2.0])
    assert not (tmp_path / "e").exists()


# --- Fisher merging --------------------------------------------------------------------------------------------


def reference_fisher(model: BertForSequenceClassification, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """E_x sum_y p(y|x) (grad log p(y|x))^2 by per-example Jacobians (torch.func), float64."""
    model = model.double().eval()
    names = [n for n, _ in model.bert.named_parameters()]
    params = {n: p.detach() for n, p in model.bert.named_parameters()}

    def log_probs(p: dict[str, torch.Tensor], example: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = torch.func.functional_call(model.bert, p, (), example)
        return model.classifier(hidden.pooler_output).log_softmax(-1)[0]

    total = {n: torch.zeros_like(params[n]) for n in names}
    count = inputs["input_ids"].shape[0]
    for row in range(count):
        example = {k: v[row : row + 1] for k, v in inputs.items()}
        jac = torch.func.jacrev(log_probs)(params, example)
        probs = log_probs(params, example).exp()
        for n in names:
            total[n] += torch.einsum("y,y...->...", probs, jac[n].square())
    return {f"{n}": t / count for n, t in total.items()}


def test_fisher_merging_is_the_fisher_weighted_average(cls_pool: Path, tmp_path: Path) -> None:
    fuse(cls_pool, "fisher_merging", tmp_path / "f", calibration_samples=6, batch_size=4)
    got = load_file(tmp_path / "f" / "model.safetensors")
    numerator: dict[str, torch.Tensor] = {}
    denominator: dict[str, torch.Tensor] = {}
    for task in TASKS:
        model = BertForSequenceClassification.from_pretrained(cls_pool / task)
        fisher = reference_fisher(model, calibration_inputs(cls_pool, task, 6))
        norm = torch.sqrt(sum(f.square().sum() for f in fisher.values()))
        scale = 1.0 / (norm + 1e-6)
        for name, p in model.bert.named_parameters():
            w = (fisher[name] + 1e-6) * scale
            numerator[name] = numerator.get(name, 0) + w * p.detach().double()
            denominator[name] = denominator.get(name, 0) + w
    assert set(numerator) <= set(got)
    for name in numerator:
        torch.testing.assert_close(got[name].double(), numerator[name] / denominator[name], atol=2e-6, rtol=1e-4)
    reloaded = BertModel.from_pretrained(tmp_path / "f")
    assert torch.equal(
        reloaded.state_dict()["encoder.layer.0.attention.self.query.weight"],
        got["encoder.layer.0.attention.self.query.weight"],
    )


# --- RegMean ---------------------------------------------------------------------------------------------------


def reference_regmean(pool: Path, n: int, ratio: float) -> dict[str, torch.Tensor]:
    """The closed form W^T = (sum G_i)^-1 sum G_i W_i^T per linear, G_i over real (non-padding) tokens."""
    grams: dict[str, list[torch.Tensor]] = {}
    weights: dict[str, list[torch.Tensor]] = {}
    states = []
    for task in TASKS:
        model = BertForSequenceClassification.from_pretrained(pool / task).double().eval()
        inputs = calibration_inputs(pool, task, n)
        mask = inputs["attention_mask"].bool()
        captured: dict[str, torch.Tensor] = {}
        hooks = [
            m.register_forward_hook(lambda mod, a, o, name=name: captured.__setitem__(name, a[0]))
            for name, m in model.bert.named_modules()
            if isinstance(m, torch.nn.Linear)
        ]
        with torch.no_grad():
            model(**inputs)
        for h in hooks:
            h.remove()
        for name, x in captured.items():
            x = x[mask] if x.dim() == 3 else x
            g = x.T @ x / x.shape[0]
            g = g * ratio + torch.diag(torch.diagonal(g)) * (1 - ratio)
            grams.setdefault(name, []).append(g)
            weights.setdefault(name, []).append(model.bert.get_submodule(name).weight.detach())
        states.append({k: v.detach() for k, v in model.bert.state_dict().items()})
    merged = {k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]}
    for name in grams:
        merged[f"{name}.weight"] = torch.linalg.inv(sum(grams[name])) @ sum(
            g @ w.T for g, w in zip(grams[name], weights[name])
        )
        merged[f"{name}.weight"] = merged[f"{name}.weight"].T
    return merged


def test_regmean_is_the_closed_form_least_squares_merge(cls_pool: Path, tmp_path: Path) -> None:
    fuse(cls_pool, "regmean", tmp_path / "r", calibration_samples=8, batch_size=3, reduce_non_diagonal_ratio=0.7)
    got = load_file(tmp_path / "r" / "model.safetensors")
    want = reference_regmean(cls_pool, 8, 0.7)
    for name, tensor in want.items():
        if name in got and got[name].is_floating_point():
            torch.testing.assert_close(got[name].double(), tensor, atol=5e-5, rtol=1e-4, msg=name)
    assert "encoder.layer.1.output.dense.weight" in got


def test_regmean_plusplus_of_one_model_is_that_model(cls_pool: Path, tmp_path: Path) -> None:
    fuse(cls_pool, "regmean_plusplus", tmp_path / "r", tasks=["reviews_b"], calibration_samples=6)
    assert_same_outputs(backbone(tmp_path / "r"), expert_backbones(cls_pool)[1], batch(cls_pool), atol=1e-4)
    fuse(cls_pool, "regmean_plusplus", tmp_path / "r3", calibration_samples=6)
    fuse(cls_pool, "regmean", tmp_path / "r1", calibration_samples=6)
    a, b = load_file(tmp_path / "r3" / "model.safetensors"), load_file(tmp_path / "r1" / "model.safetensors")
    first = "encoder.layer.0.attention.self.query.weight"  # its inputs come from merged embeddings instead
    assert not torch.allclose(
        a["encoder.layer.1.attention.self.query.weight"], b["encoder.layer.1.attention.self.query.weight"], atol=1e-6
    )
    assert a[first].shape == b[first].shape


def test_regmean_leaves_inputs_no_example_activates_at_the_models_mean() -> None:
    from hf_fusion.methods.regmean import GramStore

    torch.manual_seed(0)
    inputs = torch.randn(20, 4)
    inputs[:, 3] = 0  # a dead unit: its Gram row and column are zero, so the summed Gram is singular
    weights = [torch.randn(5, 4) for _ in range(2)]
    store = GramStore(1.0)
    for w in weights:
        store.add("layer", inputs.T @ inputs, w)
    merged = store.solve("layer", sum(weights) / 2)
    torch.testing.assert_close(merged[:, 3], (weights[0][:, 3] + weights[1][:, 3]) / 2)
    live = (inputs[:, :3].T @ inputs[:, :3]).double()
    closed_form = torch.linalg.solve(2 * live, sum(live @ w[:, :3].double().T for w in weights)).T.float()
    torch.testing.assert_close(merged[:, :3], closed_form, rtol=1e-5, atol=1e-5)


def test_regmean_plusplus_passes_merged_hidden_states_on_however_a_block_takes_them() -> None:
    from hf_fusion.methods.regmean import _next_inputs

    old, new, mask = torch.zeros(2, 3), torch.ones(2, 3), torch.ones(2, 1)
    assert _next_inputs((new, None), (old, mask), {"x": 1}) == ((new, mask), {"x": 1})
    args, kwargs = _next_inputs(new, (), {"hidden_states": old, "attention_mask": mask})
    assert args == () and kwargs["hidden_states"] is new and kwargs["attention_mask"] is mask
    with pytest.raises(FusionError, match="hidden states"):
        _next_inputs(new, (), {"inputs_embeds": old})


def test_data_methods_need_a_pool(cls_pool: Path, tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="needs unlabelled data"):
        hf_fusion.merge(
            models=[str(cls_pool / t) for t in TASKS],
            base=str(cls_pool / "base"),
            method="regmean",
            output=tmp_path / "x",
            show_progress=False,
        )
    assert not (tmp_path / "x").exists()


# --- AdaMerging ------------------------------------------------------------------------------------------------


def test_adamerging_without_steps_is_task_arithmetic(cls_pool: Path, tmp_path: Path) -> None:
    fuse(cls_pool, "task_wise_adamerging", tmp_path / "a", steps=0, init_values=0.25)
    base, vectors = base_and_task_vectors(cls_pool)
    got = backbone(tmp_path / "a").state_dict()
    for name in vectors[0]:
        if got[name].is_floating_point():
            torch.testing.assert_close(
                got[name].double(), base[name] + 0.25 * sum(v[name] for v in vectors), atol=1e-6, rtol=1e-5
            )


@pytest.mark.parametrize("method", ["task_wise_adamerging", "layer_wise_adamerging"])
def test_adamerging_learns_saves_and_reuses_its_coefficients(cls_pool: Path, tmp_path: Path, method: str) -> None:
    fuse(cls_pool, method, tmp_path / "a", steps=4, lr=0.05, batch_size=4, clamp_weights=True)
    saved = json.loads((tmp_path / "a" / "merging_weights.json").read_text())
    lam = torch.tensor(saved["coefficients"], dtype=torch.float64)
    assert lam.shape[0] == 3 and saved["steps"] == 4
    assert not torch.allclose(lam, torch.full_like(lam, 0.3)) and lam.min() >= 0 and lam.max() <= 1
    base, vectors = base_and_task_vectors(cls_pool)
    names = [n for n, _ in backbone(cls_pool / "base").named_parameters()]
    assert saved.get("parameters", names) == names
    got = backbone(tmp_path / "a").state_dict()
    for j, name in enumerate(names):
        column = lam if lam.dim() == 1 else lam[:, j]
        want = base[name] + sum(c * v[name] for c, v in zip(column, vectors))
        torch.testing.assert_close(got[name].double(), want, atol=1e-6, rtol=1e-5)
    fuse(cls_pool, method, tmp_path / "b", weights=str(tmp_path / "a" / "merging_weights.json"), clamp_weights=True)
    assert (
        load_file(tmp_path / "a" / "model.safetensors").keys() == load_file(tmp_path / "b" / "model.safetensors").keys()
    )
    for name, t in load_file(tmp_path / "a" / "model.safetensors").items():
        assert torch.equal(t, load_file(tmp_path / "b" / "model.safetensors")[name])


def test_adamerging_refuses_a_missing_weights_file(cls_pool: Path, tmp_path: Path) -> None:
    with pytest.raises(ParameterError, match="does not exist"):
        fuse(cls_pool, "layer_wise_adamerging", tmp_path / "a", weights=str(tmp_path / "nope.json"))


# --- WEMoE -----------------------------------------------------------------------------------------------------


def test_wemoe_with_fixed_routing_is_task_arithmetic(cls_pool: Path, tmp_path: Path) -> None:
    """With 0 router layers every routing weight is init_lambda, so the mixture is task arithmetic everywhere."""
    fuse(cls_pool, "weight_ensembling_moe", tmp_path / "w", steps=0, router_hidden_layers=0, init_lambda=0.4)
    fused = AutoModel.from_pretrained(tmp_path / "w").eval()
    assert isinstance(fused, FusedUpscaledModel)
    base, vectors = base_and_task_vectors(cls_pool)
    reference = backbone(cls_pool / "base")
    reference.load_state_dict({k: (base[k] + 0.4 * sum(v[k] for v in vectors)).float() for k in base})
    assert_same_outputs(fused, reference, batch(cls_pool))


def test_wemoe_trains_routers_and_reloads_identically(cls_pool: Path, tmp_path: Path) -> None:
    fuse(cls_pool, "weight_ensembling_moe", tmp_path / "w", steps=3, lr=0.01, batch_size=4)
    fused = AutoModel.from_pretrained(tmp_path / "w").eval()
    router = fused.routers["encoder__layer__0"]
    assert not torch.allclose(router.layers[-1].bias, torch.full((3,), 0.3))
    again = AutoModel.from_pretrained(tmp_path / "w").eval()
    assert_same_outputs(fused, again, batch(cls_pool), atol=0)
    # per-sample routing: a sample's output does not depend on the other samples of its batch
    inputs = batch(cls_pool, ("good movie review", "bad plot review"))
    alone = {k: v[:1] for k, v in batch(cls_pool, ("good movie review",)).items()}
    with torch.no_grad():
        together = fused(**inputs).pooler_output[0]
        single = fused(**alone).pooler_output[0]
    torch.testing.assert_close(together, single, atol=1e-5, rtol=1e-4)


def test_sparse_wemoe_keeps_the_largest_task_vector_entries(cls_pool: Path, tmp_path: Path) -> None:
    fuse(cls_pool, "sparse_weight_ensembling_moe", tmp_path / "s", steps=0, tv_prune_ratio=0.75)
    fused = AutoModel.from_pretrained(tmp_path / "s")
    module = fused.backbone.encoder.layer[1].intermediate.dense
    base = backbone(cls_pool / "base").encoder.layer[1].intermediate.dense.weight
    for i, expert in enumerate(expert_backbones(cls_pool)):
        tau = (expert.encoder.layer[1].intermediate.dense.weight - base).detach()
        kept = module.task_weights[i]
        assert int((kept != 0).sum()) == tau.numel() - int(0.75 * tau.numel())
        threshold = tau.abs().flatten().sort().values[int(0.75 * tau.numel())]
        assert torch.equal(kept, torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau)))


# --- SMILE -----------------------------------------------------------------------------------------------------


def test_smile_with_one_expert_has_that_experts_linears(cls_pool: Path, tmp_path: Path) -> None:
    """Full-rank experts and one task: every linear is the expert's; other modules stay pretrained."""
    fuse(cls_pool, "smile_upscaling", tmp_path / "s", tasks=["reviews_c"])
    expert = expert_backbones(cls_pool)[2]
    reference = backbone(cls_pool / "base")
    linears = {
        f"{n}.{p}" for n, m in expert.named_modules() if isinstance(m, torch.nn.Linear) for p in ("weight", "bias")
    }
    reference.load_state_dict({k: v for k, v in expert.state_dict().items() if k in linears}, strict=False)
    assert_same_outputs(AutoModel.from_pretrained(tmp_path / "s").eval(), reference, batch(cls_pool), atol=1e-4)


def test_smile_routes_to_the_expert_whose_subspace_holds_the_input(cls_pool: Path, tmp_path: Path) -> None:
    fuse(cls_pool, "smile_upscaling", tmp_path / "s", k=4, gate_k=2, top_k=2)
    fused = AutoModel.from_pretrained(tmp_path / "s").eval()
    layer = fused.backbone.encoder.layer[0].attention.self.query
    w0 = backbone(cls_pool / "base").encoder.layer[0].attention.self.query
    experts = [e.encoder.layer[0].attention.self.query for e in expert_backbones(cls_pool)]
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, outs = [], []
        for e in experts:
            u, s, vh = torch.linalg.svd((e.weight - w0.weight).double())
            logits.append((x.double() @ vh[:2].T).norm(dim=-1))
            outs.append(x.double() @ (u[:, :4] * s[:4] @ vh[:4]).T + (e.bias - w0.bias).double())
        probs = torch.stack(logits, 1).softmax(-1)
        top, idx = probs.topk(2, dim=-1)
        top = top / top.sum(-1, keepdim=True)
        want = (x.double() @ w0.weight.double().T + w0.bias.double()).clone()
        for row in range(5):
            for weight, e in zip(top[row], idx[row]):
                want[row] += weight * outs[e][row]
        torch.testing.assert_close(layer(x).double(), want, atol=1e-5, rtol=1e-4)


# --- up-scaling ------------------------------------------------------------------------------------------------


def test_mixtral_upcycling_of_one_model_keeps_its_function(cls_pool: Path, tmp_path: Path) -> None:
    fuse(cls_pool, "mixtral_upscaling", tmp_path / "m", tasks=["reviews_a"], num_experts=4, experts_per_token=2)
    fused = AutoModel.from_pretrained(tmp_path / "m").eval()
    assert len(fused.backbone.encoder.layer[0].intermediate.experts) == 4
    assert_same_outputs(fused, expert_backbones(cls_pool)[0], batch(cls_pool), atol=1e-5)


def test_mixtral_moe_merging_uses_each_models_feed_forward(cls_pool: Path, tmp_path: Path) -> None:
    fuse(cls_pool, "mixtral_upscaling", tmp_path / "m", experts_per_token=1)
    fused = AutoModel.from_pretrained(tmp_path / "m").eval()
    moe = fused.backbone.encoder.layer[1].intermediate
    for expert, model in zip(moe.experts, expert_backbones(cls_pool)):
        assert torch.equal(expert[0].dense.weight, model.encoder.layer[1].intermediate.dense.weight)
        assert torch.equal(expert[1].weight, model.encoder.layer[1].output.dense.weight)
    models = expert_backbones(cls_pool)
    mean = torch.stack([m.encoder.layer[0].attention.self.key.weight for m in models]).mean(0)
    torch.testing.assert_close(fused.backbone.encoder.layer[0].attention.self.key.weight, mean)


def test_depth_upscaling_stacks_the_chosen_layers(cls_pool: Path, tmp_path: Path) -> None:
    fuse(cls_pool, "depth_upscaling", tmp_path / "d", tasks=["reviews_a"], layer_indices=["0:2", 1])
    deep = BertModel.from_pretrained(tmp_path / "d")
    source = expert_backbones(cls_pool)[0]
    assert deep.config.num_hidden_layers == 3
    for new, old in enumerate([0, 1, 1]):
        for (name, a), b in zip(
            deep.encoder.layer[new].state_dict().items(), source.encoder.layer[old].state_dict().values()
        ):
            assert torch.equal(a, b), name


def test_model_recombination_takes_whole_blocks_from_the_models(cls_pool: Path, tmp_path: Path) -> None:
    fuse(cls_pool, "model_recombination", tmp_path / "c", seed=3)
    fused = BertModel.from_pretrained(tmp_path / "c")
    models = expert_backbones(cls_pool)
    for i, layer in enumerate(fused.encoder.layer):
        state = layer.state_dict()
        assert any(all(torch.equal(state[k], m.encoder.layer[i].state_dict()[k]) for k in state) for m in models)
    fuse(cls_pool, "model_recombination", tmp_path / "c2", seed=3)
    assert (
        load_file(tmp_path / "c" / "model.safetensors").keys()
        == load_file(tmp_path / "c2" / "model.safetensors").keys()
    )


# --- evaluation of fused modules --------------------------------------------------------------------------------


def test_an_ensemble_of_one_scores_like_its_member(cls_pool: Path, tmp_path: Path) -> None:
    result = hf_fusion.merge(
        pool=str(cls_pool / "pool.yaml"),
        method="simple_ensemble",
        tasks=["reviews_b"],
        output=tmp_path / "e",
        evaluate=EvalSettings(metrics="bundled"),
        show_progress=False,
    )
    scores = result.evaluation.results[0].scores
    assert scores["fused"] == scores["individual"]
