"""Causal language modelling: perplexity of the model under test on a text column (token-level NLL).

For data-driven fusion the task gives logits: the next-token scores at every real (non-padding) position, one row
per token, so entropy is averaged over tokens as a classifier's is over examples."""

from __future__ import annotations

from typing import Any

import torch

from hf_fusion.tasks.base import EvalSettings, TaskContext, TaskEvaluator, text_lengths, tokenizer_for
from hf_fusion.tasks.weights import ModelUnderTest, load_network, place


class CausalLM(TaskEvaluator):
    def __init__(self, spec: Any, context: TaskContext, settings: EvalSettings) -> None:
        super().__init__(spec, context, settings)
        self.tokenizer = tokenizer_for(context.base, context.expert.folder)

    def encode(self, batch: dict[str, list[Any]]) -> dict[str, torch.Tensor]:
        """The texts of a batch, tokenised, on the device."""
        encoded = self.tokenizer(
            batch[self.spec.text[0]],
            padding=True,
            truncation=True,
            max_length=self.spec.max_length,
            return_tensors="pt",
        )
        return {k: v.to(self.settings.device) for k, v in encoded.items()}

    def logits(self, network: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(real tokens, vocabulary) next-token scores."""
        scores = network(**inputs).logits
        mask = inputs.get("attention_mask")
        return scores[mask.bool()] if mask is not None else scores.reshape(-1, scores.shape[-1])

    def example_lengths(self) -> list[int] | None:
        return text_lengths(self.tokenizer, [self.data[self.spec.text[0]]], self.spec.max_length)

    def network(self, model: ModelUnderTest) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        return place(load_network(AutoModelForCausalLM, model, self.context.base, "cpu"), self.settings)

    def predict(self, network: torch.nn.Module, batch: dict[str, list[Any]]) -> tuple[list[Any], list[Any]]:
        """Each text's summed token NLL (as the prediction) and its token count (as the reference)."""
        encoded = self.encode(batch)
        logits = network(**encoded).logits[:, :-1]
        targets = encoded["input_ids"][:, 1:].to(logits.device)
        mask = encoded["attention_mask"][:, 1:].bool().to(logits.device)
        token_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), targets, reduction="none")
        return (token_nll * mask).sum(dim=1).tolist(), mask.sum(dim=1).tolist()
