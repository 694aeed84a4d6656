"""Jinja templates for the model cards of fused models (installed as ``hf_fusion.model_cards``)."""
