"""Jinja templates for the model cards of fused models."""
