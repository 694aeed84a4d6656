"""LoRA adapters made from full models: the difference between a fine-tune (or a merge) and its base, factorised
into a peft adapter of a chosen rank."""

from hf_fusion.adapters.extract import LowRankFactors, choose_rank, factorise
from hf_fusion.adapters.extract_folder import ExtractionResult, extract_lora

__all__ = ["ExtractionResult", "LowRankFactors", "choose_rank", "extract_lora", "factorise"]
