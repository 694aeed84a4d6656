"""Fusing models whose vocabularies differ (``tokenizer: base | union | MODEL``) and choosing the output's chat
template: the rows every token gets, the tokenizer and config written, and inputs refused before any weight is
read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from vocab_models import TEMPLATE_A, TEMPLATE_B, VocabPool

import hf_fusion
from hf_fusion.engine.checkpoint import SafetensorsCheckpoint
from hf_fusion.errors import IncompatibleModelsError, RecipeError
from hf_fusion.fusion.tokenizer_choice import most_common_template

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


class Input:
    """One input as saved: its tensors and its vocabulary (token -> id)."""

    def __init__(self, folder: Path) -> None:
        self.state = load_file(folder / "model.safetensors")
        self.vocab = AutoTokenizer.from_pretrained(folder).get_vocab()

    def row(self, tensor: str, token: str) -> torch.Tensor:
        return self.state[tensor if tensor in self.state else EMBED][self.vocab[token]].float()


def presented(inputs: list[Input], i: int, base: int | None, tensor: str, token: str) -> torch.Tensor:
    """The documented rule: the input's own row, else the base's, else the mean of the inputs that have the token."""
    if token in inputs[i].vocab:
        return inputs[i].row(tensor, token)
    if base is not None and token in inputs[base].vocab:
        return inputs[base].row(tensor, token)
    return torch.stack([x.row(tensor, token) for x in inputs if token in x.vocab]).mean(dim=0)


def mean_token_row(x: Input, tensor: str) -> torch.Tensor:
    name = tensor if tensor in x.state else EMBED
    return x.state[name][sorted(set(x.vocab.values()))].float().mean(dim=0)


def merge(pool: VocabPool, out: Path, **options) -> hf_fusion.MergeResult:
    options.setdefault("models", [str(pool.ft_a), str(pool.ft_b)])
    return hf_fusion.merge(output=out, show_progress=False, **options)


def fused(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    return load_file(out / "model.safetensors"), AutoTokenizer.from_pretrained(out).get_vocab()


def test_union_rows_follow_the_documented_rule_under_task_arithmetic(vocab_pool: VocabPool, tmp_path: Path) -> None:
    out = tmp_path / "union"
    merge(vocab_pool, out, base=str(vocab_pool.base), method="task_arithmetic", scaling_factor=0.7, tokenizer="union")
    state, vocab = fused(out)
    inputs = [Input(vocab_pool.base), Input(vocab_pool.ft_a), Input(vocab_pool.ft_b)]
    base_vocab = inputs[0].vocab
    # The base's tokens keep their ids; then ft_a's extras in id order, then ft_b's that are still missing.
    assert {t: vocab[t] for t in base_vocab} == base_vocab
    assert [vocab[t] for t in ["<tool>", "<a_only>", "<b_only>", "<b_extra>"]] == [32, 33, 34, 35]
    assert len(vocab) == 36 and state[EMBED].shape[0] == 36 and state[HEAD].shape[0] == 36
    for tensor in (EMBED, HEAD):
        for token, row in vocab.items():
            base = presented(inputs, 0, 0, tensor, token)
            deltas = sum(presented(inputs, i, 0, tensor, token) - base for i in (1, 2))
            torch.testing.assert_close(state[tensor][row], base + 0.7 * deltas, msg=f"{tensor} {token}")
    # What that means, token by token: a token only one model has is that model's row; a token only the base has is
    # the base's row; a token the models share (moved to another id in ft_b) is fused as usual.
    for tensor in (EMBED, HEAD):
        torch.testing.assert_close(state[tensor][vocab["<a_only>"]], inputs[1].row(tensor, "<a_only>"))
        torch.testing.assert_close(state[tensor][vocab["<b_extra>"]], inputs[2].row(tensor, "<b_extra>"))
        torch.testing.assert_close(state[tensor][vocab["<base_only>"]], inputs[0].row(tensor, "<base_only>"))
        word = inputs[0].row(tensor, "w3")
        expected = word + 0.7 * (inputs[1].row(tensor, "w3") - word + inputs[2].row(tensor, "w3") - word)
        torch.testing.assert_close(state[tensor][vocab["w3"]], expected)
    up = "model.layers.0.mlp.up_proj.weight"
    b = inputs[0].state[up]
    torch.testing.assert_close(state[up], b + 0.7 * (inputs[1].state[up] - b + inputs[2].state[up] - b))


def test_union_output_loads_encodes_and_generates(vocab_pool: VocabPool, tmp_path: Path) -> None:
    out = tmp_path / "union"
    merge(vocab_pool, out, base=str(vocab_pool.base), method="task_arithmetic", tokenizer="union")
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == len(tokenizer) == 36 == model.get_input_embeddings().weight.shape[0]
    for token, expected in {"<tool>": 32, "<a_only>": 33, "<b_only>": 34, "<b_extra>": 35}.items():
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [expected]
    assert tokenizer.added_tokens_decoder[33].special and not tokenizer.added_tokens_decoder[32].special
    prompt = tokenizer("hello <tool> <b_only> <a_only> world", return_tensors="pt")
    assert prompt["input_ids"].tolist() == [[vocab_for(tokenizer, "hello"), 32, 34, 33, vocab_for(tokenizer, "world")]]
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 9) and int(generated.max()) < 36
    recipe = (out / "fusion_recipe.yaml").read_text()
    card = (out / "README.md").read_text()
    assert "tokenizer: union" in recipe and "tokenizer: union" in card and "--tokenizer union" in card


def vocab_for(tokenizer, token: str) -> int:  # type: ignore[no-untyped-def]
    return tokenizer.convert_tokens_to_ids(token)


def test_union_without_a_base_averages_and_keeps_one_sided_rows(vocab_pool: VocabPool, tmp_path: Path) -> None:
    out = tmp_path / "avg"
    merge(vocab_pool, out, method="simple_average", tokenizer="union")
    state, vocab = fused(out)
    inputs = [Input(vocab_pool.ft_a), Input(vocab_pool.ft_b)]
    assert {t: vocab[t] for t in inputs[0].vocab} == inputs[0].vocab  # the first model's vocabulary leads
    assert [vocab["<b_only>"], vocab["<b_extra>"]] == [33, 34] and state[EMBED].shape[0] == 35
    for tensor in (EMBED, HEAD):
        for token, row in vocab.items():
            expected = (presented(inputs, 0, None, tensor, token) + presented(inputs, 1, None, tensor, token)) / 2
            torch.testing.assert_close(state[tensor][row], expected)
        torch.testing.assert_close(state[tensor][vocab["<b_only>"]], inputs[1].row(tensor, "<b_only>"))


def test_base_mode_keeps_the_base_vocabulary(vocab_pool: VocabPool, tmp_path: Path) -> None:
    out = tmp_path / "base"
    merge(vocab_pool, out, base=str(vocab_pool.base), method="task_arithmetic", scaling_factor=0.5, tokenizer="base")
    state, vocab = fused(out)
    inputs = [Input(vocab_pool.base), Input(vocab_pool.ft_a), Input(vocab_pool.ft_b)]
    assert vocab == inputs[0].vocab and state[EMBED].shape[0] == 32
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 32
    for token, row in vocab.items():
        base = inputs[0].row(EMBED, token)
        deltas = sum(presented(inputs, i, 0, EMBED, token) - base for i in (1, 2))
        torch.testing.assert_close(state[EMBED][row], base + 0.5 * deltas)
    torch.testing.assert_close(state[HEAD][vocab["<base_only>"]], inputs[0].row(HEAD, "<base_only>"))


def test_model_mode_takes_its_vocabulary_and_padding(vocab_pool: VocabPool, tmp_path: Path) -> None:
    """ft_b pads 34 tokens to 40 rows: the output keeps 40 rows, the padding rows are each input's mean token row."""
    out = tmp_path / "b"
    merge(
        vocab_pool,
        out,
        base=str(vocab_pool.base),
        method="task_arithmetic",
        scaling_factor=1.0,
        tokenizer=str(vocab_pool.ft_b),
    )
    state, vocab = fused(out)
    inputs = [Input(vocab_pool.base), Input(vocab_pool.ft_a), Input(vocab_pool.ft_b)]
    assert vocab == inputs[2].vocab and len(vocab) == 34
    assert state[EMBED].shape[0] == state[HEAD].shape[0] == 40
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 40
    for tensor in (EMBED, HEAD):
        for token, row in vocab.items():
            base = presented(inputs, 0, 0, tensor, token)
            deltas = sum(presented(inputs, i, 0, tensor, token) - base for i in (1, 2))
            torch.testing.assert_close(state[tensor][row], base + deltas)
        base = mean_token_row(inputs[0], tensor)
        padding = base + sum(mean_token_row(inputs[i], tensor) - base for i in (1, 2))
        for row in range(34, 40):
            torch.testing.assert_close(state[tensor][row], padding)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    prompt = tokenizer("hello <b_extra> <tool>", return_tensors="pt")
    assert model.generate(**prompt, max_new_tokens=2, do_sample=False).shape == (1, 5)


def test_tied_embeddings_are_aligned_once(tied_pool: VocabPool, tmp_path: Path) -> None:
    out = tmp_path / "tied"
    merge(tied_pool, out, base=str(tied_pool.base), method="task_arithmetic", scaling_factor=0.5, tokenizer="union")
    state, vocab = fused(out)
    inputs = [Input(tied_pool.base), Input(tied_pool.ft_a), Input(tied_pool.ft_b)]
    assert HEAD not in inputs[1].state and state[EMBED].shape[0] == 36
    for token, row in vocab.items():
        base = presented(inputs, 0, 0, EMBED, token)
        deltas = sum(presented(inputs, i, 0, EMBED, token) - base for i in (1, 2))
        torch.testing.assert_close(state[EMBED][row], base + 0.5 * deltas)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.get_output_embeddings().weight, model.get_input_embeddings().weight)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.generate(**tokenizer("hello <a_only>", return_tensors="pt"), max_new_tokens=2).shape == (1, 4)


def rendered(out: Path) -> str:
    return AutoTokenizer.from_pretrained(out).apply_chat_template(MESSAGES, tokenize=False)


def test_chat_template_auto_model_and_literal(vocab_pool: VocabPool, tmp_path: Path) -> None:
    pool = dict(base=str(vocab_pool.base), method="task_arithmetic", tokenizer="union")
    merge(vocab_pool, tmp_path / "auto", chat_template="auto", **pool)  # a tie: the first model in recipe order
    assert rendered(tmp_path / "auto") == "A:hi|A:yo|"
    merge(
        vocab_pool,
        tmp_path / "auto-b",
        chat_template="auto",
        models=[str(vocab_pool.ft_b), str(vocab_pool.ft_a)],
        **pool,
    )
    assert rendered(tmp_path / "auto-b") == "B:hi|B:yo|"
    merge(vocab_pool, tmp_path / "named", chat_template=str(vocab_pool.ft_b), **pool)
    assert rendered(tmp_path / "named") == "B:hi|B:yo|"
    assert (tmp_path / "named" / "chat_template.jinja").read_text() == TEMPLATE_B
    literal = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    result = merge(vocab_pool, tmp_path / "literal", chat_template=literal, **pool)
    assert rendered(tmp_path / "literal") == "<user>hi<assistant>yo"
    assert result.recipe.chat_template == literal
    card = (tmp_path / "literal" / "README.md").read_text()
    assert "--chat-template" in card
    # Without the option the reference's (the base's: none) is kept.
    merge(vocab_pool, tmp_path / "none", **pool)
    assert AutoTokenizer.from_pretrained(tmp_path / "none").chat_template is None


def test_chat_template_without_tokenizer_option(vocab_pool: VocabPool, tmp_path: Path) -> None:
    """Models sharing a vocabulary: the reference's tokenizer is kept, with the chosen template."""
    plain = tmp_path / "plain"
    shutil.copytree(vocab_pool.ft_a, plain)
    (plain / "chat_template.jinja").unlink()
    models = [str(plain), str(vocab_pool.ft_a)]
    merge(vocab_pool, tmp_path / "auto", models=models, method="simple_average", chat_template="auto")
    assert rendered(tmp_path / "auto") == "A:hi|A:yo|"
    assert (tmp_path / "auto" / "chat_template.jinja").read_text() == TEMPLATE_A
    assert (
        AutoTokenizer.from_pretrained(tmp_path / "auto").get_vocab() == AutoTokenizer.from_pretrained(plain).get_vocab()
    )
    merge(vocab_pool, tmp_path / "none", models=models, method="simple_average")
    assert AutoTokenizer.from_pretrained(tmp_path / "none").chat_template is None
    with pytest.raises(RecipeError, match="has no chat template"):
        merge(vocab_pool, tmp_path / "x", models=models, method="simple_average", chat_template=str(plain))


def test_most_common_template_breaks_ties_by_order() -> None:
    assert most_common_template(["a", "b", "b", None]) == "b"
    assert most_common_template([None, "b", "a"]) == "b"
    assert most_common_template([None, None]) is None


@pytest.fixture
def no_weight_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a weight was read")

    monkeypatch.setattr(SafetensorsCheckpoint, "read_rows", refuse)


def test_bad_requests_are_refused_before_any_weight_is_read(
    vocab_pool: VocabPool, tmp_path: Path, no_weight_reads: None
) -> None:
    out = tmp_path / "out"
    pool = dict(base=str(vocab_pool.base), method="task_arithmetic")
    with pytest.raises(RecipeError, match="neither `base`, `union` nor one of the inputs"):
        merge(vocab_pool, out, tokenizer=str(tmp_path / "elsewhere"), **pool)
    with pytest.raises(RecipeError, match="neither `auto`, one of the inputs .* nor a Jinja template"):
        merge(vocab_pool, out, chat_template="chatml", **pool)
    with pytest.raises(RecipeError, match="tokenizer: base needs a base model"):
        merge(vocab_pool, out, method="simple_average", tokenizer="base")
    with pytest.raises(RecipeError, match="applies to tensor-wise methods only; simple_ensemble is model-wise"):
        merge(vocab_pool, out, method="simple_ensemble", tokenizer="union")
    bare = tmp_path / "bare"
    shutil.copytree(vocab_pool.ft_a, bare)
    for path in bare.iterdir():
        if path.name.startswith(("tokenizer", "chat_template")):
            path.unlink()
    with pytest.raises(IncompatibleModelsError, match=f"{bare} has no tokenizer files"):
        merge(vocab_pool, out, models=[str(bare), str(vocab_pool.ft_b)], tokenizer="union", **pool)
    short = tmp_path / "short"
    shutil.copytree(vocab_pool.ft_a, short)
    tokenizer = AutoTokenizer.from_pretrained(short)
    tokenizer.add_tokens(["<no_row>"])
    tokenizer.save_pretrained(short)
    with pytest.raises(IncompatibleModelsError, match=f"{short}: its tokenizer has token ids up to 33 .* 33 rows"):
        merge(vocab_pool, out, models=[str(short), str(vocab_pool.ft_b)], tokenizer="union", **pool)
    assert not out.exists()


def test_without_the_options_different_vocabularies_are_still_refused(vocab_pool: VocabPool, tmp_path: Path) -> None:
    with pytest.raises(IncompatibleModelsError, match="has shape"):
        merge(vocab_pool, tmp_path / "out", base=str(vocab_pool.base), method="task_arithmetic")


def test_hub_inputs_fetch_tokenizers_before_weights(hub, vocab_pool: VocabPool, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A Hub model's tokenizer files are fetched alone to align vocabularies; a refusal downloads no weights."""
    from hub_helpers import publish

    publish(hub, "vocab-lab/ft-a", vocab_pool.ft_a)
    short = tmp_path / "short"
    shutil.copytree(vocab_pool.ft_b, short)
    tokenizer = AutoTokenizer.from_pretrained(short)
    tokenizer.add_tokens([f"<extra{i}>" for i in range(8)])
    tokenizer.save_pretrained(short)
    publish(hub, "vocab-lab/ft-b-short", short)
    since = len(hub.state.requests)
    with pytest.raises(IncompatibleModelsError, match="vocab-lab/ft-b-short: its tokenizer has token ids up to 41"):
        merge(
            vocab_pool,
            tmp_path / "o",
            models=["vocab-lab/ft-a", "vocab-lab/ft-b-short"],
            method="simple_average",
            tokenizer="union",
        )
    gets = [p for m, p, _, rng in hub.state.requests[since:] if m == "GET" and "/resolve/" in p and rng is None]
    assert any(p.endswith("/tokenizer.json") for p in gets)
    assert not [p for p in gets if p.endswith(".safetensors")]
    assert not (tmp_path / "o").exists()
    publish(hub, "vocab-lab/ft-b", vocab_pool.ft_b)
    result = merge(
        vocab_pool,
        tmp_path / "ok",
        models=["vocab-lab/ft-a", "vocab-lab/ft-b"],
        method="simple_average",
        tokenizer="vocab-lab/ft-b",
    )
    assert result.recipe.tokenizer == "vocab-lab/ft-b" and result.recipe.models[1].commit
    assert AutoTokenizer.from_pretrained(tmp_path / "ok").get_vocab() == Input(vocab_pool.ft_b).vocab
    assert "--tokenizer vocab-lab/ft-b" in (tmp_path / "ok" / "README.md").read_text()


def test_cli_flags_reach_the_recipe(vocab_pool: VocabPool, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hf_fusion.cli import main

    out = tmp_path / "cli"
    argv = ["merge", "--repo-ids", str(vocab_pool.ft_a), str(vocab_pool.ft_b), "--method", "simple_average"]
    argv += ["--tokenizer", "union", "--chat-template", str(vocab_pool.ft_b), "--output", str(out), "-q"]
    assert main(argv) == 0
    recipe = hf_fusion.Recipe.from_yaml(out / "fusion_recipe.yaml")
    assert (recipe.tokenizer, recipe.chat_template) == ("union", str(vocab_pool.ft_b))
    assert rendered(out) == "B:hi|B:yo|" and len(AutoTokenizer.from_pretrained(out)) == 35
    again = tmp_path / "again"
    assert main(["merge", "--config", str(out / "fusion_recipe.yaml"), "--output", str(again), "-q"]) == 0
    assert torch.equal(fused(again)[0][EMBED], fused(out)[0][EMBED])
