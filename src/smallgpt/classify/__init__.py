"""Fine-tune a pretrained GPT as a text classifier: `smallgpt classify train|eval|predict|ablate`."""
