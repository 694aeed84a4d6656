"""Tiny Llama models whose tokenizers differ: a base and fine-tunes that added different tokens, one of them with its
vocabulary re-ordered and padded, and a pool with tied embeddings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = [f"w{i}" for i in range(26)] + ["hello", "world"]
SPECIALS = ["[UNK]", "<s>", "</s>"]
TEMPLATE_A = "{% for m in messages %}A:{{ m['content'] }}|{% endfor %}"
TEMPLATE_B = "{% for m in messages %}B:{{ m['content'] }}|{% endfor %}"


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: the special tokens, then ``words``, one id each in that order."""
    vocab = {t: i for i, t in enumerate(SPECIALS + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")


def llama(vocab_size: int, *, tied: bool, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def perturbed(model: LlamaForCausalLM, seed: int) -> LlamaForCausalLM:
    """A 'fine-tune': every weight moved by a little noise."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model


def save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast | None, folder: Path) -> Path:
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


@dataclass(frozen=True)
class VocabPool:
    base: Path
    ft_a: Path
    ft_b: Path


def build_pool(root: Path, *, tied: bool) -> VocabPool:
    """``base``: the words plus ``<base_only>``. ``ft_a``: the words plus ``<tool>`` and the special ``<a_only>``
    (``add_tokens`` + ``resize_token_embeddings``). ``ft_b``: the words in reverse order (every id moved), plus
    ``<b_only>``, ``<tool>`` and ``<b_extra>``, padded to a multiple of 8 rows (unless tied)."""
    start = llama(len(SPECIALS) + len(WORDS), tied=tied, seed=0)

    base_tok = word_tokenizer(WORDS)
    base_tok.add_tokens(["<base_only>"])
    base = llama(len(SPECIALS) + len(WORDS), tied=tied, seed=0)
    base.load_state_dict(start.state_dict())
    base.resize_token_embeddings(len(base_tok), mean_resizing=False)

    a_tok = word_tokenizer(WORDS)
    a_tok.add_tokens(["<tool>"])
    a_tok.add_tokens([AddedToken("<a_only>", special=True, normalized=False)], special_tokens=True)
    a_tok.chat_template = TEMPLATE_A
    ft_a = llama(len(SPECIALS) + len(WORDS), tied=tied, seed=0)
    ft_a.load_state_dict(start.state_dict())
    ft_a.resize_token_embeddings(len(a_tok), mean_resizing=False)
    perturbed(ft_a, 1)

    b_tok = word_tokenizer(WORDS[::-1])
    b_tok.add_tokens(["<b_only>", "<tool>", "<b_extra>"])
    b_tok.chat_template = TEMPLATE_B
    ft_b = llama(len(SPECIALS) + len(WORDS), tied=tied, seed=0)
    state = start.state_dict()
    order = list(range(len(SPECIALS))) + [len(SPECIALS) + WORDS.index(w) for w in WORDS[::-1]]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        state[name] = state[name][order].clone()
    ft_b.load_state_dict(state)
    ft_b.resize_token_embeddings(len(b_tok), pad_to_multiple_of=None if tied else 8, mean_resizing=False)
    perturbed(ft_b, 2)

    return VocabPool(
        base=save(base, base_tok, root / "base"),
        ft_a=save(ft_a, a_tok, root / "ft_a"),
        ft_b=save(ft_b, b_tok, root / "ft_b"),
    )
