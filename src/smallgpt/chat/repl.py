"""`smallgpt chat --run DIR`: talk to a model trained on chat data (see chat/format.py).

The conversation is kept as encoded turns; each reply is generated from the system message
(`--system`) and the most recent whole turns that fit in the model's context next to the longest
reply (`ChatFormat.context_prompt`), and stops at the model's end-of-turn. Lines starting with `/`
are commands: /reset, /history, /quit.
Non-interactive: `--message TEXT` prints one reply, and lines piped on stdin are read until EOF.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

import numpy as np

from smallgpt.chat.format import (
    BOT,
    MAX_REPLY,
    NO_SYSTEM_TURN,
    SYSTEM,
    USER,
    ChatFormat,
    Conversation,
    Turn,
    context_budget,
    default_reply_tokens,
)
from smallgpt.data.tokenizers import Unseen
from smallgpt.errors import UserError
from smallgpt.generate import Generator, SamplingOptions, print_note
from smallgpt.runs import find_checkpoint
from smallgpt.train import checkpoint

COMMANDS_HELP = "commands: /reset forgets the conversation, /history shows it, /quit ends"


@dataclass
class ChatArgs(SamplingOptions):
    run: str = field(default="", metadata={"help": "run folder made by smallgpt train", "required": True})
    message: str | None = field(default=None, metadata={"help": "print the reply to this message and exit"})
    system: str | None = field(
        default=None,
        metadata={"help": "a system message, first in the model's context all along (runs with <|system|>)"},
    )
    max_new_tokens: int | None = field(  # type: ignore[assignment]  # chat() fills None in from the model
        default=None,
        metadata={"help": f"longest reply, in tokens (none: half the model's context, at most {MAX_REPLY})"},
    )
    top_k: int | None = field(default=50, metadata={"help": "keep only the k most likely tokens (none: off)"})
    repetition_penalty: float = field(
        default=1.1, metadata={"help": "above 1 makes tokens already in the context less likely"}
    )


class ChatSession:
    """A conversation with a loaded run: the system message, the turns so far, and replies
    generated from them. `notice` receives what the user should know (unseen characters, a message
    too long for the context, a system message the run has no turn for), one line each."""

    def __init__(self, generator: Generator, notice: Callable[[str], None], system: str | None = None):
        self.generator, self.notice = generator, notice
        self.format = ChatFormat(generator.tokenizer)
        self.block_size = generator.model.config.block_size
        self.reply_tokens = generator.options.max_new_tokens
        context_budget(self.block_size, self.reply_tokens)  # a reply that leaves no room is refused now
        self.system_text = system if system and self.format.has_system else None
        if system and not self.format.has_system:
            notice(NO_SYSTEM_TURN)
        self.system = self._encode(SYSTEM, self.system_text) if self.system_text else None
        self.turns: list[tuple[Turn, np.ndarray]] = []  # every turn, with its encoded ids

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.turns = []

    def in_context(self) -> int:
        """Index of the oldest turn the model still sees."""
        return self.format.in_context(self.system, self._encoded(), self.block_size, self.reply_tokens)

    def reply(self, text: str, out: TextIO) -> str | None:
        """Stream the bot's answer to `text` to `out`, one line; None (an empty line) if the message
        does not fit in the context, so piped input still gets one line per message."""
        self.turns.append((Turn(USER, text), self._encode(USER, text)))
        try:
            prompt = self.format.context_prompt(
                self.system, self._encoded(), self.block_size, self.reply_tokens
            )
        except UserError as e:
            self.turns.pop()
            self.notice(str(e))
            out.write("\n")
            return None
        answer, reply_ids = self._generate(prompt, out)
        self.turns.append((Turn(BOT, answer), self.format.encode_turn(BOT, reply_ids)))
        return answer

    def reply_to(self, conversation: Conversation) -> str:
        """The answer to a whole conversation (the Python API's messages), this session's turns
        aside; its notes (unseen characters, an ignored system message) go to `notice` once."""
        prompt, notes = self.format.conversation_prompt(conversation, self.block_size, self.reply_tokens)
        for note in notes:
            self.notice(note)
        return self._generate(prompt, io.StringIO())[0]

    def _generate(self, prompt: list[int], out: TextIO) -> tuple[str, list[int]]:
        """Stream the reply to `prompt` to `out` until the model's end of turn: (text, ids)."""
        reply_ids: list[int] = []
        for piece in self.generator.text_stream(prompt, self.format.stop_ids, reply_ids):
            out.write(piece)
            out.flush()
        out.write("\n")
        return self.generator.tokenizer.decode(reply_ids), reply_ids

    def _encode(self, role: str, text: str) -> np.ndarray:
        ids, unseen = self.format.encode_message(role, text)
        self._report(unseen)
        return ids

    def _report(self, unseen: Unseen) -> None:
        if note := unseen.note():
            self.notice(note)

    def _encoded(self) -> list[tuple[str, np.ndarray]]:
        return [(turn.role, ids) for turn, ids in self.turns]

    def history(self) -> str:
        first = self.in_context()
        lines = [f"{turn.role}: {turn.text}" for turn, _ in self.turns]
        if first:
            lines.insert(first, "--- (the model no longer sees the turns above) ---")
        if self.system_text:
            lines.insert(0, f"system: {self.system_text}")
        return "\n".join(lines) if lines else "(no conversation yet)"


def chat(args: ChatArgs, stdin: TextIO | None = None, out: TextIO | None = None) -> None:
    """Talk to a chat run: one `--message`, or a conversation read from the terminal or stdin."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    if args.max_new_tokens is None:
        ckpt = find_checkpoint(args.run, args.checkpoint)
        args.max_new_tokens = default_reply_tokens(checkpoint.read_model_config(ckpt).block_size)
    session = ChatSession(Generator(args.run, args), print_note, args.system)
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
