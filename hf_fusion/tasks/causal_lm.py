"""Causal language modelling: perplexity of the model under test on a text column (token-level NLL)."""

from __future__ import annotations

from typing import Any

import torch

from hf_fusion.tasks.base import EvalSettings, TaskContext, TaskEvaluator, tokenizer_for
from hf_fusion.tasks.weights import ModelUnderTest, load_network


class CausalLM(TaskEvaluator):
    def __init__(self, spec: Any, context: TaskContext, settings: EvalSettings) -> None:
        super().__init__(spec, context, settings)
        self.tokenizer = tokenizer_for(context.base, context.expert.folder)

    @torch.no_grad()
    def predictions(self, model: ModelUnderTest) -> tuple[list[Any], list[Any], dict[str, Any]]:
        from transformers import AutoModelForCausalLM

        network = load_network(AutoModelForCausalLM, model, self.context.base, self.settings.device)
        nll, counts = [], []
        for batch in self.batches():
            encoded = self.tokenizer(batch[self.spec.text[0]], padding=True, truncation=True, max_length=self.spec.max_length,
                                     return_tensors="pt").to(self.settings.device)
            logits = network(**encoded).logits[:, :-1]
            targets = encoded["input_ids"][:, 1:]
            mask = encoded["attention_mask"][:, 1:].bool()
            token_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), targets, reduction="none")
            nll += (token_nll * mask).sum(dim=1).tolist()
            counts += mask.sum(dim=1).tolist()
        return nll, counts, {}
