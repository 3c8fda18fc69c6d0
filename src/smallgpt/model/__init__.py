"""The GPT model and its options."""

from smallgpt.model.gpt import GPT, KVCache, ModelConfig

__all__ = ["GPT", "KVCache", "ModelConfig"]
