"""Evaluation task kinds, one implementation each: CLIP zero-shot image classification, classification with each
task's own head (text or image), text-to-text generation, and causal language modelling."""
