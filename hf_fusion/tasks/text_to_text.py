"""Text-to-text tasks (Flan-T5 on GLUE): prompts filled from each example, greedy generation, and exact match
against the label's target word, or Spearman correlation for a regression target such as STS-B.

For data-driven fusion the task also gives logits: the first decoded token's scores, over the first token of each
target word where the targets are words (so they are class logits, as for a classifier), else over the vocabulary."""

from __future__ import annotations

import re
from typing import Any

import torch

from hf_fusion.tasks.base import EvalSettings, TaskContext, TaskEvaluator, text_lengths, tokenizer_for
from hf_fusion.tasks.weights import ModelUnderTest, load_network, place

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
MAX_NEW_TOKENS = 8


class TextToText(TaskEvaluator):
    def __init__(self, spec: Any, context: TaskContext, settings: EvalSettings) -> None:
        super().__init__(spec, context, settings)
        self.tokenizer = tokenizer_for(context.base, context.expert.folder)
        self.regression = isinstance(spec.targets, str)
        config = context.expert.config() or {}
        start = config.get("decoder_start_token_id")
        self.decoder_start = int(start if start is not None else (config.get("pad_token_id") or 0))
        self.target_tokens = None if self.regression else self._first_target_tokens(list(spec.targets))

    def _first_target_tokens(self, targets: list[str]) -> list[int] | None:
        """The first token of each target word, or None when two targets start alike (then the logits cannot tell
        them apart and the whole vocabulary is used)."""
        first = [ids[0] for ids in self.tokenizer(targets, add_special_tokens=False)["input_ids"] if ids]
        return first if len(first) == len(targets) and len(set(first)) == len(first) else None

    def _reference(self, label: Any) -> Any:
        if self.regression:
            return float(label)
        return self.spec.targets[int(label)]

    def _prediction(self, text: str) -> Any:
        if not self.regression:
            return text.strip()
        match = _NUMBER.search(text)
        return float(match.group()) if match else 0.0

    def _prompts(self, batch: dict[str, list[Any]]) -> list[str]:
        return [self.spec.prompt.format(**dict(zip(batch, values))) for values in zip(*batch.values())]

    def encode(self, batch: dict[str, list[Any]]) -> dict[str, torch.Tensor]:
        """The prompts of a batch, tokenised, on the device."""
        encoded = self.tokenizer(
            self._prompts(batch), padding=True, truncation=True, max_length=self.spec.max_length, return_tensors="pt"
        )
        return {k: v.to(self.settings.device) for k, v in encoded.items()}

    def logits(self, network: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        start = torch.full((inputs["input_ids"].shape[0], 1), self.decoder_start, device=inputs["input_ids"].device)
        scores = network(**inputs, decoder_input_ids=start).logits[:, 0]
        return scores if self.target_tokens is None else scores[:, self.target_tokens]

    def _greedy(self, network: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Greedy decoding by repeated forward passes, for fused modules that have no ``generate`` (ensembles,
        routed mixtures); it stops when every sequence has emitted the end token."""
        eos = self.tokenizer.eos_token_id
        decoded = torch.full((inputs["input_ids"].shape[0], 1), self.decoder_start, device=inputs["input_ids"].device)
        finished = torch.zeros(decoded.shape[0], dtype=torch.bool, device=decoded.device)
        for _ in range(MAX_NEW_TOKENS):
            step = network(**inputs, decoder_input_ids=decoded).logits[:, -1].argmax(dim=-1)
            if eos is not None:
                step = step.masked_fill(finished, self.tokenizer.pad_token_id or 0)
                finished |= step.eq(eos)
            decoded = torch.cat([decoded, step[:, None]], dim=1)
            if finished.all():
                break
        return decoded

    def example_lengths(self) -> list[int] | None:
        prompts = self._prompts(self.data[:])
        return text_lengths(self.tokenizer, [prompts], self.spec.max_length)

    def network(self, model: ModelUnderTest) -> torch.nn.Module:
        from transformers import AutoModelForSeq2SeqLM

        return place(load_network(AutoModelForSeq2SeqLM, model, self.context.base, "cpu"), self.settings)

    def predict(self, network: torch.nn.Module, batch: dict[str, list[Any]]) -> tuple[list[Any], list[Any]]:
        from transformers import GenerationMixin

        inputs = self.encode(batch)
        if isinstance(network, GenerationMixin):
            output = network.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        else:
            output = self._greedy(network, inputs)
        texts = self.tokenizer.batch_decode(output, skip_special_tokens=True)
        return [self._prediction(t) for t in texts], [self._reference(label) for label in batch[self.spec.label]]

    def metric_arguments(self) -> dict[str, Any]:
        return {} if self.regression else {"ignore_case": True, "ignore_punctuation": True}
