"""The Gradio Space: interactive fusion and side-by-side comparison, over the same pipeline as the CLI."""

from hf_fusion.space.app import SpaceLimits, build_app, create_app, free_port, in_a_space, launch, serving

__all__ = ["SpaceLimits", "build_app", "create_app", "free_port", "in_a_space", "launch", "serving"]
