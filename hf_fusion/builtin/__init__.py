"""Models and data that ship with hf-fusion: the experts of the ``minilm-text3`` pool and its datasets."""
