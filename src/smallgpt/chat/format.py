"""The chat format: conversations as token ids, with turn markers and a loss mask.

A conversation is a list of turns, each `user` or `bot`. A turn is encoded as

    <|user|> text <|end|>        or        <|bot|> text <|end|>

and a dialogue (or a window of one, see `windows`) is followed by `<|endoftext|>`, as documents are
in pretraining. The three markers are special tokens appended after the tokenizer's vocabulary, so
they work with every tokenizer kind and text can never produce them. The loss mask is 1 on the
tokens a chat model must learn to write: a bot turn's text and its `<|end|>` (not the `<|bot|>`
marker, which the chat REPL writes itself). At chat time the prompt is the history followed by
`<|bot|>`, and the reply ends at `<|end|>`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from smallgpt.data.tokenizers import Tokenizer
from smallgpt.errors import UserError

USER, BOT = "user", "bot"
ROLES = (USER, BOT)
USER_TOKEN, BOT_TOKEN, END_TOKEN = "<|user|>", "<|bot|>", "<|end|>"
CHAT_TOKENS = (USER_TOKEN, BOT_TOKEN, END_TOKEN)


@dataclass(frozen=True)
class Turn:
    role: str  # user | bot
    text: str


Conversation = list[Turn]


def alternate(utterances: Sequence[str]) -> Conversation:
    """Turns of a two-party dialogue given as bare utterances: user first, then bot, and so on."""
    return [Turn(ROLES[i % 2], text) for i, text in enumerate(utterances)]


OPENAI_ROLES = {"user": USER, "assistant": BOT}  # OpenAI's message roles; "system" has no turn here


def turns_from_messages(messages: Sequence[Mapping[str, Any]]) -> Conversation:
    """OpenAI-style messages ([{"role": "user", "content": "..."}, ...]) as turns; system messages
    are skipped (the format has no turn for them), and the last turn must be the user's."""
    turns: Conversation = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, Mapping) else None
        if role not in (*OPENAI_ROLES, "system") or not isinstance(message.get("content"), str):
            raise UserError(
                f"message {i} must be {{'role': 'user' | 'assistant' | 'system', 'content': text}}, "
                f"got {message!r}"
            )
        if role in OPENAI_ROLES:
            turns.append(Turn(OPENAI_ROLES[role], message["content"]))
    if not turns or turns[-1].role != USER:
        raise UserError("the last message (other than system ones) must be the user's: the model answers it")
    return turns


class ChatFormat:
    """Encodes and decodes conversations with a tokenizer that has the chat special tokens."""

    def __init__(self, tokenizer: Tokenizer):
        missing = [t for t in CHAT_TOKENS if t not in tokenizer.special_tokens]
        if missing:
            raise UserError(
                f"the tokenizer has no chat tokens ({', '.join(missing)}): "
                "prepare the data with `smallgpt prepare --format chat`"
            )
        self.tokenizer = tokenizer
        ids = tokenizer.special_tokens
        self.marker = {USER: ids[USER_TOKEN], BOT: ids[BOT_TOKEN]}
        self.end_id, self.eot_id = ids[END_TOKEN], tokenizer.eot_id
        # a reply ends at its end-of-turn; the others only if the model skips it
        self.stop_ids = (self.end_id, self.eot_id, self.marker[USER], self.marker[BOT])

    def encode_text(self, text: str, unknown: str = "error") -> np.ndarray:
        return np.asarray(self.tokenizer.encode_to_array(text, unknown), dtype=np.int64)

    def encode_turn(self, role: str, text_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """<|role|> text <|end|> as ids."""
        return np.concatenate(([self.marker[role]], np.asarray(text_ids, dtype=np.int64), [self.end_id]))

    def encode(self, conversation: Conversation) -> tuple[np.ndarray, np.ndarray]:
        """(ids, loss mask) of a conversation, without the closing end-of-text."""
        turns = [self.encode_turn(t.role, self.encode_text(t.text)) for t in conversation]
        roles = [t.role for t in conversation]
        return join_turns(turns, roles)

    def decode(self, ids: Sequence[int]) -> Conversation:
        """The turns in `ids`: text between a role marker and `<|end|>` (or the end of `ids`)."""
        roles = {i: role for role, i in self.marker.items()}
        turns: Conversation = []
        role: str | None = None
        text_ids: list[int] = []
        for i in list(ids) + [self.end_id]:
            if role is not None and (i == self.end_id or i in roles or i == self.eot_id):
                turns.append(Turn(role, self.tokenizer.decode(text_ids)))
                role = None
            if i in roles:
                role, text_ids = roles[i], []
            elif role is not None:
                text_ids.append(i)
        return turns

    def prompt(self, turns: Sequence[np.ndarray]) -> list[int]:
        """A new dialogue (end-of-text, as after the previous one in training), the turns, <|bot|>."""
        return [self.eot_id, *(int(i) for turn in turns for i in turn), self.marker[BOT]]


def join_turns(turns: Sequence[np.ndarray], roles: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated turn ids and their mask: 1 on a bot turn's tokens after its marker."""
    masks = []
    for ids, role in zip(turns, roles, strict=True):
        mask = np.zeros(len(ids), dtype=np.uint8)
        if role == BOT:
            mask[1:] = 1
        masks.append(mask)
    if not turns:
        return np.zeros(0, np.int64), np.zeros(0, np.uint8)
    return np.concatenate(turns), np.concatenate(masks)


def windows(lengths: Sequence[int], roles: Sequence[str], max_tokens: int) -> list[tuple[int, int]]:
    """Split a dialogue's turns into windows [start, stop) of whole turns of at most `max_tokens`.

    Greedy: a window grows until the next turn does not fit. A window that must start at a bot
    turn starts one turn earlier instead when that user turn fits with it, so the bot's reply keeps
    the message it answers. A single turn longer than `max_tokens` is a window of its own (the
    caller cuts it).
    """
    spans: list[tuple[int, int]] = []
    start, size = 0, 0
    for i, n in enumerate(lengths):
        if i > start and size + n > max_tokens:
            spans.append((start, i))
            start, size = i, 0
            if roles[i] == BOT and roles[i - 1] == USER and lengths[i - 1] + n <= max_tokens:
                start, size = i - 1, lengths[i - 1]
        size += n
    if lengths:
        spans.append((start, len(lengths)))
    return spans


def cut_turn(ids: np.ndarray, max_tokens: int) -> np.ndarray:
    """A turn longer than `max_tokens` keeps its marker, its first text tokens and its <|end|>."""
    if len(ids) <= max_tokens:
        return ids
    return np.concatenate((ids[: max_tokens - 1], ids[-1:]))


def keep_recent(lengths: Sequence[int], budget: int) -> int:
    """Index of the oldest turn to keep so that the most recent turns total at most `budget` tokens."""
    total, first = 0, len(lengths)
    for i in range(len(lengths) - 1, -1, -1):
        if total + lengths[i] > budget:
            break
        total += lengths[i]
        first = i
    return first
