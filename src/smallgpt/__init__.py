"""smallgpt: train small GPT language models from scratch, sample, chat and classify."""

__version__ = "0.1.0"
