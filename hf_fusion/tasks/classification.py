"""Classification where each task keeps its expert's head: the backbone under test plus the task's head, for text
(sequence classification) or images (image classification), built from the expert's config."""

from __future__ import annotations

import fnmatch
from typing import Any

import torch

from hf_fusion.tasks.base import EvalSettings, TaskContext, TaskEvaluator, text_lengths, tokenizer_for
from hf_fusion.tasks.weights import (
    ModelUnderTest,
    build_model,
    load_fused_module,
    place,
    read_state,
    without_heads,
)


class HeadClassification(TaskEvaluator):
    def __init__(self, spec: Any, context: TaskContext, settings: EvalSettings) -> None:
        super().__init__(spec, context, settings)
        from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

        config = context.expert.config()
        if config is None:
            raise ValueError(f"task {spec.name}: the expert {context.expert.folder} has no config.json")
        self.config = config
        self.is_text = bool(spec.text)
        self.auto_class = AutoModelForSequenceClassification if self.is_text else AutoModelForImageClassification
        expert = context.expert.checkpoint()
        self.head = read_state(
            expert, [n for n in expert.entries if any(fnmatch.fnmatchcase(n, p) for p in context.heads)]
        )
        if self.is_text:
            self.tokenizer = tokenizer_for(context.expert.folder, context.base)
            if self.config.get("pad_token_id") is None:
                self.config = {**self.config, "pad_token_id": self.tokenizer.pad_token_id}
        else:
            from transformers import AutoImageProcessor

            self.image_processor = AutoImageProcessor.from_pretrained(
                context.expert.folder
                if (context.expert.folder / "preprocessor_config.json").is_file()
                else context.base
            )

    def encode(self, batch: dict[str, list[Any]]) -> dict[str, torch.Tensor]:
        """Model inputs of a batch of examples, on the device."""
        if self.is_text:
            columns = [batch[c] for c in self.spec.text]
            encoded = self.tokenizer(
                *columns, padding=True, truncation=True, max_length=self.spec.max_length, return_tensors="pt"
            )
        else:
            images = [image.convert("RGB") for image in batch[self.spec.image]]
            encoded = self.image_processor(images=images, return_tensors="pt")
        return {k: v.to(self.settings.device) for k, v in encoded.items()}

    def task_network(self, backbone: torch.nn.Module) -> torch.nn.Module:
        """The task's classifier (its expert's head) around ``backbone``, a module that stands in for the model's
        own backbone (a fused ensemble or mixture, or a backbone under training)."""
        base = without_heads(
            read_state(ModelUnderTest("pretrained", self.context.base).checkpoint()), self.context.heads
        )
        network = build_model(self.auto_class, self.config, {**self.head, **base}, "task", self.settings.device)
        setattr(network, network.base_model_prefix, backbone.to(self.settings.device))
        return network

    def logits(self, network: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return network(**inputs).logits

    def example_lengths(self) -> list[int] | None:
        if not self.is_text:
            return None
        return text_lengths(self.tokenizer, [self.data[c] for c in self.spec.text], self.spec.max_length)

    def network(self, model: ModelUnderTest) -> torch.nn.Module:
        module = load_fused_module(model, self.settings.device)
        if module is not None:
            return place(self.task_network(module).eval(), self.settings)
        state = {**self.head, **without_heads(read_state(model.checkpoint()), self.context.heads)}
        return place(build_model(self.auto_class, self.config, state, model.label, "cpu"), self.settings)

    def predict(self, network: torch.nn.Module, batch: dict[str, list[Any]]) -> tuple[list[Any], list[Any]]:
        return network(**self.encode(batch)).logits.argmax(dim=-1).tolist(), list(batch[self.spec.label])
