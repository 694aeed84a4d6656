"""Model-wise fusion: methods that need modules, data or training (ensembles, Fisher, RegMean, AdaMerging, WEMoE,
upscaling). They run on loaded transformers modules instead of the tensor streaming engine."""
