"""Tiny random model pools (a base and perturbed "fine-tuned" copies) for the tests (not shipped in the wheel).

They have the tensor layout of real transformers checkpoints (BERT, GPT-2, CLIP) at a few hundred KB each, so
every code path of a fusion runs in milliseconds without the Hub.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)


def bert(num_labels: int = 3) -> PreTrainedModel:
    cfg = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg)


def gpt2() -> PreTrainedModel:
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32))


def _clip_vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )


def clip_vision() -> PreTrainedModel:
    return CLIPVisionModel(_clip_vision_config())


def clip_full() -> PreTrainedModel:
    text = CLIPTextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        projection_dim=16,
    )
    return CLIPModel(
        CLIPConfig(text_config=text.to_dict(), vision_config=_clip_vision_config().to_dict(), projection_dim=16)
    )


DECODER_SHAPE = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "bos_token_id": 2,
    "eos_token_id": 3,
    "pad_token_id": 0,
}


def llama() -> PreTrainedModel:
    return LlamaForCausalLM(LlamaConfig(**DECODER_SHAPE))


def mistral() -> PreTrainedModel:
    return MistralForCausalLM(MistralConfig(**DECODER_SHAPE, sliding_window=8))


def qwen2() -> PreTrainedModel:
    return Qwen2ForCausalLM(Qwen2Config(**DECODER_SHAPE))


DECODERS: dict[str, Callable[[], PreTrainedModel]] = {"llama": llama, "mistral": mistral, "qwen2": qwen2}

DECODER_WORDS = (
    "the cat sat on a mat dog ran fast code python function loop bug math sum number prime proof poem rhyme "
    "verse song story king queen red green blue and of to is"
).split()


def decoder_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer within the decoders' 64 ids, with BOS/EOS/PAD/UNK."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + DECODER_WORDS)}
    assert len(vocab) <= DECODER_SHAPE["vocab_size"]
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


ARCHITECTURES: dict[str, Callable[[], PreTrainedModel]] = {
    "bert": bert,
    "gpt2": gpt2,
    "clip_vision": clip_vision,
    **DECODERS,
}


def example_inputs(arch: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if arch == "clip_vision":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
    return {"input_ids": torch.randint(0, 64, (2, 12), generator=g)}


def make_pool(
    root: Path,
    arch: str,
    num_experts: int = 3,
    *,
    seed: int = 0,
    noise: float = 0.02,
    dtype: torch.dtype = torch.float32,
    **save_kwargs,
) -> tuple[Path, list[Path]]:
    """Saves a random base and ``num_experts`` variants (base + Gaussian noise on every float tensor)."""
    torch.manual_seed(seed)
    base = ARCHITECTURES[arch]().to(dtype)
    base_dir = root / f"{arch}_base"
    base.save_pretrained(base_dir, **save_kwargs)
    experts = []
    for i in range(num_experts):
        model = ARCHITECTURES[arch]().to(dtype)
        model.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(seed * 100 + i + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_((torch.randn(p.shape, generator=g) * noise * (1 + i)).to(dtype))
        path = root / f"{arch}_ft{i}"
        model.save_pretrained(path, **save_kwargs)
        experts.append(path)
    return base_dir, experts
