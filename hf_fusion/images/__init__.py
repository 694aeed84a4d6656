"""Comparing diffusion models by their pictures: :mod:`~hf_fusion.images.render` (the same prompts, seeds and
scheduler for every model), :mod:`~hf_fusion.images.clip` (per-model CLIP scores), :mod:`~hf_fusion.images.grid`
(the labelled grid) and :mod:`~hf_fusion.images.comparison` (all three, and the PNG and JSON they are saved as)."""
