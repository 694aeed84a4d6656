"""CLIP score: how well each image matches its prompt, as torchmetrics defines it (hf-fusion's bundled metric module).

For an image I and its caption C, ``100 * max(cos(E_I, E_C), 0)`` with E the CLIP model's projected image and text
embeddings, averaged over the pairs (Hessel et al., 2021, "CLIPScore", with weight 100 instead of 2.5). The CLIP model
is an argument, so the score runs without network from a folder or the cache.
"""

import datasets
import evaluate
import huggingface_hub
import numpy
import torch
import transformers

DEFAULT_MODEL = "openai/clip-vit-base-patch32"


def _features(output):
    """The projected embeddings: a tensor in transformers 4, an output's ``pooler_output`` in transformers 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _load(name, local_files_only):
    """The CLIP model and processor, from a folder, or by Hub id from the cache (and the Hub when online)."""
    offline = huggingface_hub.constants.is_offline_mode()
    attempts = [True] if local_files_only or offline else [True, False]
    error = None
    for cached_only in attempts:
        try:
            model = transformers.CLIPModel.from_pretrained(name, local_files_only=cached_only, use_safetensors=True)
            processor = transformers.CLIPProcessor.from_pretrained(name, local_files_only=cached_only)
            return model, processor
        except OSError as err:
            error = err
    where = "the local cache" if len(attempts) == 1 else "the local cache or the Hub"
    raise OSError(
        f"cannot load the CLIP model {name!r} from {where} ({type(error).__name__}): pass a folder or Hub id of a "
        "CLIP model with its processor, and download it once while online."
    ) from None


class ClipScore(evaluate.Metric):
    """Images as predictions, their prompts as references; the CLIP model is chosen by ``model_name_or_path``."""

    def _info(self):
        return evaluate.MetricInfo(
            description="100 * max(cosine(CLIP image embedding, CLIP text embedding), 0), averaged over the pairs.",
            citation="Hessel et al., CLIPScore: A Reference-free Evaluation Metric for Image Captioning, EMNLP 2021.",
            inputs_description=(
                "predictions: list of PIL images; references: list of str (each image's prompt); "
                f"model_name_or_path (str, default {DEFAULT_MODEL!r}): CLIP model folder or Hub id; "
                "device (str, default 'cpu'); batch_size (int, default 32); local_files_only (bool, default False: "
                "the cache first, then the Hub unless HF_HUB_OFFLINE is set). Returns clip_score (the mean) and "
                "clip_scores (one per pair)."
            ),
            features=datasets.Features({"predictions": datasets.Image(), "references": datasets.Value("string")}),
        )

    def _compute(
        self,
        predictions,
        references,
        model_name_or_path=DEFAULT_MODEL,
        device="cpu",
        batch_size=32,
        local_files_only=False,
    ):
        model, processor = _load(model_name_or_path, local_files_only)
        model = model.to(device=device, dtype=torch.float32).eval()
        images = [image.convert("RGB") for image in predictions]
        texts = list(references)
        scores = []
        for start in range(0, len(texts), batch_size):
            inputs = processor(
                text=texts[start : start + batch_size],
                images=images[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
            ).to(device)
            with torch.inference_mode():
                image_embeds = _features(model.get_image_features(pixel_values=inputs["pixel_values"]))
                text_embeds = _features(
                    model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
                )
            cosine = torch.nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
            scores.extend((100 * cosine.clamp(min=0)).cpu().tolist())
        return {"clip_score": float(numpy.mean(scores)) if scores else float("nan"), "clip_scores": scores}
