"""Text-to-text tasks (Flan-T5 on GLUE): prompts filled from each example, greedy generation, and exact match
against the label's target word, or Spearman correlation for a regression target such as STS-B."""

from __future__ import annotations

import re
from typing import Any

import torch

from hf_fusion.tasks.base import EvalSettings, TaskContext, TaskEvaluator, tokenizer_for
from hf_fusion.tasks.weights import ModelUnderTest, load_network

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class TextToText(TaskEvaluator):
    def __init__(self, spec: Any, context: TaskContext, settings: EvalSettings) -> None:
        super().__init__(spec, context, settings)
        self.tokenizer = tokenizer_for(context.base, context.expert.folder)
        self.regression = isinstance(spec.targets, str)

    def _reference(self, label: Any) -> Any:
        if self.regression:
            return float(label)
        return self.spec.targets[int(label)]

    def _prediction(self, text: str) -> Any:
        if not self.regression:
            return text.strip()
        match = _NUMBER.search(text)
        return float(match.group()) if match else 0.0

    @torch.no_grad()
    def predictions(self, model: ModelUnderTest) -> tuple[list[Any], list[Any], dict[str, Any]]:
        from transformers import AutoModelForSeq2SeqLM

        network = load_network(AutoModelForSeq2SeqLM, model, self.context.base, self.settings.device)
        predicted, references = [], []
        for batch in self.batches():
            rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
            prompts = [self.spec.prompt.format(**row) for row in rows]
            encoded = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.spec.max_length, return_tensors="pt")
            output = network.generate(**encoded.to(self.settings.device), max_new_tokens=8, do_sample=False)
            texts = self.tokenizer.batch_decode(output, skip_special_tokens=True)
            predicted += [self._prediction(t) for t in texts]
            references += [self._reference(row[self.spec.label]) for row in rows]
        extra = {} if self.regression else {"ignore_case": True, "ignore_punctuation": True}
        return predicted, references, extra
