"""`smallgpt chat --run DIR`: talk to a model trained on chat data (see chat/format.py).

The conversation is kept as encoded turns; each reply is generated from the most recent whole turns
that fit in the model's context next to the longest reply (block_size - max_new_tokens), and stops
at the model's end-of-turn. Lines starting with `/` are commands: /reset, /history, /quit.
Non-interactive: `--message TEXT` prints one reply, and lines piped on stdin are read until EOF.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

import numpy as np

from smallgpt.chat.format import BOT, USER, ChatFormat, Turn, keep_recent
from smallgpt.data.tokenizers import UNK
from smallgpt.errors import UserError
from smallgpt.generate import Generator, SamplingOptions
from smallgpt.runs import find_checkpoint
from smallgpt.train import checkpoint

MAX_REPLY = 128  # default longest reply, in tokens, when the context has room for it
COMMANDS_HELP = "commands: /reset forgets the conversation, /history shows it, /quit ends"


@dataclass
class ChatArgs(SamplingOptions):
    run: str = field(default="", metadata={"help": "run folder made by smallgpt train", "required": True})
    message: str | None = field(default=None, metadata={"help": "print the reply to this message and exit"})
    max_new_tokens: int | None = field(  # type: ignore[assignment]  # chat() fills None in from the model
        default=None,
        metadata={"help": f"longest reply, in tokens (none: half the model's context, at most {MAX_REPLY})"},
    )
    top_k: int | None = field(default=50, metadata={"help": "keep only the k most likely tokens (none: off)"})
    repetition_penalty: float = field(
        default=1.1, metadata={"help": "above 1 makes tokens already in the context less likely"}
    )


def default_reply_tokens(block_size: int) -> int:
    """The longest reply unless asked otherwise: half the model's context, at most MAX_REPLY."""
    return min(MAX_REPLY, block_size // 2)


class ChatSession:
    """A conversation with a loaded run: the turns so far, and replies generated from them."""

    def __init__(self, generator: Generator, notice: Callable[[str], None]):
        self.generator, self.notice = generator, notice
        self.format = ChatFormat(generator.tokenizer)
        block_size, reply = generator.model.config.block_size, generator.options.max_new_tokens
        self.budget = block_size - reply - 2  # the prompt's end-of-text and <|bot|> marker
        if self.budget < 8:
            raise UserError(
                f"max-new-tokens {reply} leaves no room for the conversation in the model's "
                f"context of {block_size} tokens: use a smaller --max-new-tokens"
            )
        self.turns: list[tuple[Turn, np.ndarray]] = []  # every turn, with its encoded ids

    def reset(self) -> None:
        self.turns = []

    def in_context(self) -> int:
        """Index of the oldest turn the model still sees: the context starts with a user turn, as
        training windows do."""
        first = keep_recent([len(ids) for _, ids in self.turns], self.budget)
        return first + 1 if first < len(self.turns) and self.turns[first][0].role == BOT else first

    def reply(self, text: str, out: TextIO) -> str | None:
        """Stream the bot's answer to `text` to `out`, one line; None (an empty line) if the message
        cannot be used, so piped input still gets one line per message."""
        user = self._encode_user(text)
        if user is None:
            out.write("\n")
            return None
        self.turns.append((Turn(USER, text), user))
        context = [ids for _, ids in self.turns[self.in_context() :]]
        reply_ids: list[int] = []
        for piece in self.generator.text_stream(self.format.prompt(context), self.format.stop_ids, reply_ids):
            out.write(piece)
            out.flush()
        out.write("\n")
        answer = self.generator.tokenizer.decode(reply_ids)
        self.turns.append((Turn(BOT, answer), self.format.encode_turn(BOT, reply_ids)))
        return answer

    def add_turn(self, role: str, text: str) -> None:
        """A past turn of the conversation (e.g. from an API call's messages), without a reply."""
        ids = self.format.encode_text(text, unknown="replace")
        self.turns.append((Turn(role, text), self.format.encode_turn(role, ids)))

    def _encode_user(self, text: str) -> np.ndarray | None:
        tok = self.generator.tokenizer
        ids = self.format.encode_text(text, unknown="replace")
        unk = tok.special_tokens.get(UNK)
        if unk is not None and unk in ids:
            unseen = sorted({c for c in text if tok.encode(c, unknown="replace") == [unk]})
            shown = " ".join(unseen[:10]) + (" ..." if len(unseen) > 10 else "")
            self.notice(f"note: {len(unseen)} character(s) the model never saw are read as {UNK}: {shown}")
        turn = self.format.encode_turn(USER, ids)
        if len(turn) > self.budget:
            self.notice(
                f"note: that message is {len(turn)} tokens; at most {self.budget} fit next to a "
                "reply: shorten it (or lower --max-new-tokens)"
            )
            return None
        return turn

    def history(self) -> str:
        first = self.in_context()
        lines = [f"{turn.role}: {turn.text}" for turn, _ in self.turns]
        if first:
            lines.insert(first, "--- (the model no longer sees the turns above) ---")
        return "\n".join(lines) if lines else "(no conversation yet)"


def chat(args: ChatArgs, stdin: TextIO | None = None, out: TextIO | None = None) -> None:
    """Talk to a chat run: one `--message`, or a conversation read from the terminal or stdin."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    if args.max_new_tokens is None:
        ckpt = find_checkpoint(args.run, args.checkpoint)
        args.max_new_tokens = default_reply_tokens(checkpoint.read_model_config(ckpt).block_size)
    session = ChatSession(Generator(args.run, args), lambda line: print(line, file=sys.stderr))
    if args.message is not None:
        session.reply(args.message.strip(), out)
        return
    interactive = stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing for input(), wide characters included)

        out.write(f"Chatting with {args.run}. {COMMANDS_HELP}.\n")
    try:
        while (line := _read_line(stdin, interactive)) is not None:
            text = line.strip()
            if text == "/quit":
                break
            if text.startswith("/"):
                out.write(_command(session, text) + "\n")
            elif text:
                out.write("bot> " if interactive else "")
                session.reply(text, out)
    except KeyboardInterrupt:
        out.write("\n")


def _read_line(stdin: TextIO, interactive: bool) -> str | None:
    """The next line typed (with line editing on a terminal) or piped; None at the end."""
    if not interactive:
        return stdin.readline() or None
    try:
        return input("you> ")
    except EOFError:
        return None


def _command(session: ChatSession, text: str) -> str:
    if text == "/reset":
        session.reset()
        return "(conversation forgotten)"
    if text == "/history":
        return session.history()
    return f"unknown command {text}; {COMMANDS_HELP}"
