"""Readers of dialogue corpora: each yields conversations (lists of user/bot turns).

Formats (`--format` of `smallgpt prepare`; `chat` picks one per file, see `detect_format`):
  lccc-json  LCCC / CDial-GPT json: a list of dialogues, each a list of utterances, or an object
             of such lists (e.g. {"train": [...], "valid": [...]}; all of them are read)
  lccc-txt   one dialogue per line, utterances separated by TAB
  lines      one utterance per line, a blank line between dialogues
  jsonl      one {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]} per
             line (OpenAI's format, read by `chat.format.message_turn`); the system message is
             kept as the dialogue's first turn; the first other message must be the user's
LCCC text has spaces between all characters ("你 好 ！"); the lccc readers remove them
(`join_spaced`). Utterances of the first three formats alternate user, bot, user, ...
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from smallgpt.chat.format import BOT, SYSTEM, Conversation, Turn, alternate, message_turn, system_first
from smallgpt.data.readers import read_json_lines
from smallgpt.errors import UserError

SNIFF_BYTES = 1 << 16


def join_spaced(text: str) -> str:
    """Undo LCCC's spaces between characters: "打 c a l l ， 2 4 岁" -> "打call，24岁".

    A space stays only between two Latin/digit words of which one is longer than a character
    ("I love you" stays), since a run of single letters is a word LCCC spelled out.
    """
    words = text.split()
    if all(len(w) == 1 for w in words):  # the usual LCCC utterance: nothing to keep apart
        return "".join(words)
    out = words[:1]
    for prev, word in zip(words, words[1:]):
        if (len(prev) > 1 or len(word) > 1) and _is_word_char(prev[-1]) and _is_word_char(word[0]):
            out.append(" ")
        out.append(word)
    return "".join(out)


def _is_word_char(c: str) -> bool:
    """A letter or digit of an alphabet written with spaces (not Chinese/Japanese, full-width)."""
    return c.isalnum() and unicodedata.east_asian_width(c) not in ("W", "F")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line without its newline) of a UTF-8 file."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            for number, line in enumerate(f, 1):
                yield number, line.rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not valid UTF-8 text ({e.reason})") from None


def read_lccc_txt(path: Path) -> Iterator[Conversation]:
    for _, line in _lines(path):
        utterances = [join_spaced(u) for u in line.split("\t")]
        if any(utterances):
            yield alternate([u for u in utterances if u])


def read_lines(path: Path) -> Iterator[Conversation]:
    utterances: list[str] = []
    for _, line in _lines(path):
        if line.strip():
            utterances.append(line.strip())
        elif utterances:
            yield alternate(utterances)
            utterances = []
    if utterances:
        yield alternate(utterances)


def read_lccc_json(path: Path) -> Iterator[Conversation]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not valid UTF-8 text ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    groups = data.values() if isinstance(data, dict) else [data]
    for group in groups:
        if not isinstance(group, list):
            raise UserError(f"{path}: expected a list of dialogues (lists of utterance strings)")
        for index, dialogue in enumerate(group):
            if not isinstance(dialogue, list) or not all(isinstance(u, str) for u in dialogue):
                raise UserError(f"{path}: dialogue {index} is not a list of utterance strings")
            utterances = [u for u in map(join_spaced, dialogue) if u]
            if utterances:
                yield alternate(utterances)


def read_jsonl(path: Path) -> Iterator[Conversation]:
    """Chat messages, the system message first; a message with empty text is skipped."""
    for number, record in read_json_lines(path):
        where = f"{path} line {number}"
        read = (message_turn(m, where) for m in _messages(record, where))
        turns = system_first(Turn(t.role, t.text.strip()) for t in read)
        turns = [t for t in turns if t.text]
        dialogue = [t for t in turns if t.role != SYSTEM]
        if dialogue and dialogue[0].role == BOT:
            raise UserError(
                f"{where}: the first message (after system ones) is the assistant's: start with the user's"
            )
        if dialogue:
            yield turns


def _messages(record: Any, where: str) -> list[Any]:
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise UserError(f'{where}: expected {{"messages": [...]}}')
    return record["messages"]


READERS: dict[str, Callable[[Path], Iterator[Conversation]]] = {
    "lccc-json": read_lccc_json,
    "lccc-txt": read_lccc_txt,
    "lines": read_lines,
    "jsonl": read_jsonl,
}


def detect_format(path: Path) -> str:
    """.jsonl -> jsonl, .json -> lccc-json; other files: lccc-txt if their start has a TAB, else lines."""
    if path.suffix == ".jsonl":
        return "jsonl"
    if path.suffix == ".json":
        return "lccc-json"
    with open(path, "rb") as f:
        return "lccc-txt" if b"\t" in f.read(SNIFF_BYTES) else "lines"


def read_dialogues(files: list[Path], fmt: str = "chat") -> Iterator[Conversation]:
    """Conversations of every file, in order; `fmt` is a reader name or `chat` (detect per file)."""
    for path in files:
        yield from READERS[detect_format(path) if fmt == "chat" else fmt](path)
