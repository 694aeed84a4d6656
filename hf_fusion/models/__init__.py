"""Architectures hf-fusion writes when a fused model is not a stock transformers model (ensembles, routed mixtures).

Importing this package registers them with ``AutoConfig`` and ``AutoModel``, so a fused folder or Hub repo loads
with ``AutoModel.from_pretrained`` after ``import hf_fusion.models``; no remote code is involved.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel

from hf_fusion.models.ensemble import FusedEnsembleConfig, FusedEnsembleModel
from hf_fusion.models.upscaled import FusedUpscaledConfig, FusedUpscaledModel

CUSTOM_MODEL_TYPES = (FusedEnsembleConfig.model_type, FusedUpscaledConfig.model_type)

for _config, _model in ((FusedEnsembleConfig, FusedEnsembleModel), (FusedUpscaledConfig, FusedUpscaledModel)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)

__all__ = [
    "CUSTOM_MODEL_TYPES",
    "FusedEnsembleConfig",
    "FusedEnsembleModel",
    "FusedUpscaledConfig",
    "FusedUpscaledModel",
]
