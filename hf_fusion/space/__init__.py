"""The Gradio Space: interactive fusion and side-by-side comparison, over the same pipeline as the CLI."""

from hf_fusion.space.app import build_app, in_a_space, launch

__all__ = ["build_app", "in_a_space", "launch"]
