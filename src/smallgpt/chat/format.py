"""The chat format: conversations as token ids, with turn markers and a loss mask.

A conversation is a list of turns, each `system`, `user` or `bot`. A turn is encoded as

    <|system|> text <|end|>    <|user|> text <|end|>    or    <|bot|> text <|end|>

and a dialogue (or a window of one, see `windows`) is followed by `<|endoftext|>`, as documents are
in pretraining. The markers are special tokens appended after the tokenizer's vocabulary, so they
work with every tokenizer kind and text can never produce them. `<|system|>` exists only in runs
whose data had system messages (older runs and data without them have the other three): a system
turn comes first and every window of its dialogue repeats it. The loss mask is 1 on the tokens a
chat model must learn to write: a bot turn's text and its `<|end|>` (not the `<|bot|>` marker, which
the chat REPL writes itself; never a system or user turn). At chat time the prompt is the system
turn, the most recent turns that fit (`ChatFormat.context_prompt`), then `<|bot|>`, and the reply
ends at `<|end|>`.

Every surface (`smallgpt chat`, `Model.chat`, `/v1/chat/completions`) reads its messages, encodes
them and fits them in the context through this module; none has a copy of these rules.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from smallgpt.data.tokenizers import Tokenizer, Unseen
from smallgpt.errors import UserError

SYSTEM, USER, BOT = "system", "user", "bot"
ROLES = (USER, BOT)  # the two parties of a dialogue, who alternate
USER_TOKEN, BOT_TOKEN, END_TOKEN = "<|user|>", "<|bot|>", "<|end|>"
SYSTEM_TOKEN = "<|system|>"
CHAT_TOKENS = (USER_TOKEN, BOT_TOKEN, END_TOKEN)  # every chat run has these; SYSTEM_TOKEN is optional
MAX_REPLY = 128  # the default longest reply, in tokens, when the context has room for it
MIN_CONVERSATION = 8  # tokens of conversation a reply must leave room for
NO_SYSTEM_TURN = (
    "the model was trained without system messages (no <|system|> token): the system message is ignored"
)
# OpenAI's message roles ("developer" is its newer name for system), and "bot" that files may use
MESSAGE_ROLES = {"system": SYSTEM, "developer": SYSTEM, "user": USER, "assistant": BOT, "bot": BOT}


@dataclass(frozen=True)
class Turn:
    role: str  # system | user | bot
    text: str


Conversation = list[Turn]


def alternate(utterances: Sequence[str]) -> Conversation:
    """Turns of a two-party dialogue given as bare utterances: user first, then bot, and so on."""
    return [Turn(ROLES[i % 2], text) for i, text in enumerate(utterances)]


def message_turn(message: Any, where: str) -> Turn:
    """One OpenAI-style message as a turn: {"role": ..., "content": text or [{"type": "text",
    "text": ...}, ...]} (the parts joined). `where` names the message in errors."""
    if not isinstance(message, Mapping):
        raise UserError(f"{where} must be {{'role': ..., 'content': ...}}, got {type(message).__name__}")
    role = message.get("role")
    if role not in MESSAGE_ROLES:
        raise UserError(f"{where}: unknown role {role!r} (user, assistant or system)")
    content = message.get("content")
    if isinstance(content, list) and all(_is_text_part(part) for part in content):
        content = "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise UserError(f"{where}: content must be text or a list of {{'type': 'text', 'text': ...}} parts")
    return Turn(MESSAGE_ROLES[role], content)


def _is_text_part(part: Any) -> bool:
    return isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)


def system_first(turns: Iterable[Turn]) -> Conversation:
    """The format's order: every system message's text joined (one per line) into one system turn
    at the start, then the dialogue's turns in order."""
    turns = list(turns)
    system = "\n".join(t.text for t in turns if t.role == SYSTEM and t.text)
    dialogue = [t for t in turns if t.role != SYSTEM]
    return [Turn(SYSTEM, system), *dialogue] if system else dialogue


def turns_from_messages(messages: Sequence[Mapping[str, Any]]) -> Conversation:
    """OpenAI-style messages ([{"role": "user", "content": "..."}, ...]) as turns, the system turn
    first; the last message must be the user's (the model answers it). Used by `Model.chat` and
    `/v1/chat/completions`."""
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        raise UserError(f"messages must be a list of messages, got {type(messages).__name__}")
    turns = system_first(message_turn(m, f"message {i}") for i, m in enumerate(messages))
    if not turns or turns[-1].role != USER:
        raise UserError("the last message (other than system ones) must be the user's: the model answers it")
    return turns


def default_reply_tokens(block_size: int) -> int:
    """The longest reply unless asked otherwise (chat, the Python API, the server): half the
    model's context, at most MAX_REPLY."""
    return min(MAX_REPLY, block_size // 2)


def context_budget(block_size: int, reply_tokens: int) -> int:
    """Tokens of conversation that fit next to a reply of `reply_tokens`: the context less the reply
    and the prompt's end-of-text and <|bot|> marker. UserError when that leaves almost nothing."""
    budget = block_size - reply_tokens - 2
    if budget < MIN_CONVERSATION:
        raise UserError(
            f"a reply of up to {reply_tokens} tokens leaves no room for the conversation in the "
            f"model's context of {block_size} tokens: ask for a shorter reply (max_new_tokens, or "
            "max_tokens on the server)"
        )
    return budget


def first_in_context(roles: Sequence[str], lengths: Sequence[int], budget: int) -> int:
    """Index of the oldest turn the model sees: the most recent whole turns within `budget`
    tokens, starting with a user turn as training windows do."""
    first = keep_recent(lengths, budget)
    return first + 1 if first < len(roles) and roles[first] == BOT else first


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
        if SYSTEM_TOKEN in ids:  # runs whose data had system messages
            self.marker[SYSTEM] = ids[SYSTEM_TOKEN]
        self.end_id, self.eot_id = ids[END_TOKEN], tokenizer.eot_id
        # a reply ends at its end-of-turn; the others only if the model skips it
        self.stop_ids = (self.end_id, self.eot_id, *self.marker.values())

    @property
    def has_system(self) -> bool:
        return SYSTEM in self.marker

    def encode_text(self, text: str) -> np.ndarray:
        """Ids of training text (prepare built the vocabulary from it: nothing is unseen)."""
        return np.asarray(self.tokenizer.encode_to_array(text), dtype=np.int64)

    def encode_message(self, role: str, text: str) -> tuple[np.ndarray, Unseen]:
        """A message as a turn's ids, with the characters the model never saw (read as <|unk|>)."""
        ids, unseen = self.tokenizer.encode_user_text(text)
        return self.encode_turn(role, ids), unseen

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

    def in_context(
        self, system: np.ndarray | None, turns: Sequence[tuple[str, np.ndarray]], block_size: int, reply: int
    ) -> int:
        """Index of the oldest of `turns` ((role, ids) after the system turn, which is always kept)
        that the model sees next to a reply of up to `reply` tokens; len(turns) if none fits."""
        budget = context_budget(block_size, reply) - (0 if system is None else len(system))
        return first_in_context([role for role, _ in turns], [len(ids) for _, ids in turns], budget)

    def context_prompt(
        self, system: np.ndarray | None, turns: Sequence[tuple[str, np.ndarray]], block_size: int, reply: int
    ) -> list[int]:
        """The prompt of the reply to the last turn (the user's): the system turn, the most recent
        whole turns that fit next to the reply (`in_context`), then <|bot|>. The one context rule
        of `smallgpt chat`, `Model.chat` and `/v1/chat/completions`."""
        first = self.in_context(system, turns, block_size, reply)
        if first == len(turns):
            budget = context_budget(block_size, reply)
            after = f", {len(system)} of them taken by the system message" if system is not None else ""
            raise UserError(
                f"the last message is {len(turns[-1][1])} tokens; at most {budget} fit next to a reply of "
                f"up to {reply} tokens in the model's context of {block_size}{after}: shorten it or "
                "ask for a shorter reply"
            )
        kept = [ids for _, ids in turns[first:]]
        return self.prompt(kept if system is None else [system, *kept])

    def conversation_prompt(
        self, conversation: Conversation, block_size: int, reply: int
    ) -> tuple[list[int], list[str]]:
        """The prompt of the reply to a whole conversation (`turns_from_messages`: the system turn
        first, the user's last), and the notes to report once: characters the model never saw,
        a system message the run has no turn for. `Model.chat` and `/v1/chat/completions`."""
        notes, system, unseen = [], None, Unseen()
        turns: list[tuple[str, np.ndarray]] = []
        for turn in conversation:
            if turn.role == SYSTEM and not self.has_system:
                notes.append(NO_SYSTEM_TURN)
                continue
            ids, unseen_here = self.encode_message(turn.role, turn.text)
            unseen += unseen_here
            if turn.role == SYSTEM:
                system = ids
            else:
                turns.append((turn.role, ids))
        prompt = self.context_prompt(system, turns, block_size, reply)
        return prompt, [note for note in (unseen.note(), *notes) if note]


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
