"""CLIP zero-shot image classification: the pretrained text encoder turns class names x prompt templates into a
classifier; the vision tower under test (fused, pretrained or an expert) is swapped into the pretrained CLIP."""

from __future__ import annotations

from typing import Any

import torch

from hf_fusion.tasks.base import EvalSettings, TaskContext, TaskEvaluator
from hf_fusion.tasks.data import class_names
from hf_fusion.tasks.weights import ModelUnderTest, build_model, load_fused_module, place, read_state, replace_part


class ClipZeroShot(TaskEvaluator):
    def __init__(self, spec: Any, context: TaskContext, settings: EvalSettings) -> None:
        super().__init__(spec, context, settings)
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.tokenizer = AutoTokenizer.from_pretrained(context.base)
        self.image_processor = AutoImageProcessor.from_pretrained(context.base)
        base = ModelUnderTest("pretrained", context.base)
        self.config = base.config()
        self.base_state = read_state(base.checkpoint())
        self.clip = CLIPModel.from_pretrained(context.base).to(settings.device).eval()
        self.class_embeddings = self._text_classifier(class_names(spec, self.data))

    @torch.no_grad()
    def _text_classifier(self, names: list[str]) -> torch.Tensor:
        """(classes, dim): each class is the normalised mean of its normalised prompt embeddings."""
        rows = []
        for name in names:
            prompts = [template.format(name) for template in self.spec.templates]
            tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
            features = self.clip.get_text_features(**tokens.to(self.settings.device))
            features = getattr(features, "pooler_output", features)
            features = features / features.norm(dim=-1, keepdim=True)
            mean = features.mean(dim=0)
            rows.append(mean / mean.norm())
        return torch.stack(rows)

    def encode(self, batch: dict[str, list[Any]]) -> dict[str, torch.Tensor]:
        images = [image.convert("RGB") for image in batch[self.spec.image]]
        return {
            "pixel_values": self.image_processor(images=images, return_tensors="pt")["pixel_values"].to(
                self.settings.device
            )
        }

    def task_network(self, backbone: torch.nn.Module) -> torch.nn.Module:
        """The pretrained CLIP with ``backbone`` (a vision model, or a fused module wrapping one) as its vision
        tower."""
        from transformers import CLIPModel

        clip = build_model(CLIPModel, self.config, self.base_state, "task", self.settings.device)  # type: ignore[arg-type]
        backbone = backbone.to(self.settings.device)
        clip.vision_model = (
            getattr(backbone, "vision_model", None) if type(backbone).__name__ == "CLIPVisionModel" else backbone
        )
        return clip

    def logits(self, network: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Zero-shot logits: CLIP's logit scale times the cosine between image and class embeddings."""
        features = network.get_image_features(**inputs)
        features = getattr(features, "pooler_output", features)
        features = features / features.norm(dim=-1, keepdim=True)
        return network.logit_scale.exp() * features @ self.class_embeddings.to(features.device).T

    def network(self, model: ModelUnderTest) -> torch.nn.Module:
        from transformers import CLIPModel

        module = load_fused_module(model, self.settings.device)
        if module is not None:
            return place(self.task_network(module).eval(), self.settings)
        state = replace_part(self.base_state, read_state(model.checkpoint()), "vision_model.")
        return place(build_model(CLIPModel, self.config, state, model.label, "cpu"), self.settings)  # type: ignore[arg-type]

    def predict(self, network: torch.nn.Module, batch: dict[str, list[Any]]) -> tuple[list[Any], list[Any]]:
        return self.logits(network, self.encode(batch)).argmax(dim=-1).tolist(), list(batch[self.spec.label])
