"""Chat: a dialogue format with turn markers, readers of dialogue corpora, and the `chat` REPL."""
