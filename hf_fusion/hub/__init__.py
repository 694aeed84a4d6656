"""The Hugging Face Hub edge: resolve and fetch input models, push fused ones. Everything else is local."""
