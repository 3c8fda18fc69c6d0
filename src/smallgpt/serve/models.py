"""What `smallgpt serve` serves: loaded models, their prompts, and completions as they are made.

No web code here: the FastAPI app (serve/app.py) turns requests into calls on `ServedModel` and its
`Completion`s into JSON or server-sent events. Decoding itself is the shared batched path: every
model has one decode engine, in a process of its own (serve/engine.py), and each completion is
one of its requests. A completion may run past the model's context: the engine slides its window,
as `smallgpt sample` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import weakref
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import torch

from smallgpt.chat.format import CHAT_TOKENS, ChatFormat, Conversation
from smallgpt.data.tokenizers import Tokenizer, Unseen
from smallgpt.decode import CANCELLED, STOP, SamplingSettings, suppressed_ids
from smallgpt.errors import UserError
from smallgpt.generate import StreamDecoder
from smallgpt.model.gpt import GPT
from smallgpt.runs import Precision, find_checkpoint, load_source
from smallgpt.serve.engine import EngineProcess, TokenStream


class Completion:
    """One choice being generated: its text pieces as they come, then why it ended.

    `pieces()` yields text (one piece per token that completes text) and is read on an event loop:
    it never blocks, and wakes when the engine's reader thread hands over a step. Afterwards
    `finish_reason` is "stop" (end-of-text, end-of-turn or a stop text) or "length" (max_tokens
    reached) and `completion_tokens` counts the tokens the model made (the end-of-text or
    end-of-turn that ended it included). `cancel()` frees the batch slot at once.
    """

    def __init__(self, tokens: TokenStream, tokenizer: Tokenizer, stop: list[str]):
        self.tokens, self.stop = tokens, stop
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self._decoder, self._pending = StreamDecoder(tokenizer), ""

    async def pieces(self) -> AsyncIterator[str]:
        wakeups = Wakeups.of_running_loop()
        self.tokens.notify = wakeups.wake
        try:
            while self.finish_reason is None:
                ids = self.tokens.take_ready()
                if not ids and self.tokens.finish_reason is None:
                    await wakeups.wait()  # nothing was ready: no step can slip in before this waits
                    continue
                for token_id in ids:
                    if self.finish_reason is None and (text := self._read(token_id)):
                        yield text
                if self.finish_reason is None and self.tokens.finish_reason is not None:
                    if text := self._end(self.tokens.finish_reason):
                        yield text
        finally:
            self.tokens.close()  # a no-op when the request ended; frees its slot when it did not

    async def text(self) -> str:
        return "".join([piece async for piece in self.pieces()])

    def cancel(self) -> None:
        """End the request, also waking a reader waiting for its next token."""
        self.tokens.close()
        self.tokens.put(CANCELLED)
        if self.tokens.notify is not None:
            self.tokens.notify()

    def _read(self, token_id: int) -> str:
        """The text that token_id lets through; ends the completion at a stop id or stop text."""
        self.completion_tokens += 1
        if token_id in self.tokens.settings.stop_ids:
            return self._end(STOP)
        self._pending += self._decoder.push(token_id)
        ready, self._pending, stopped = split_at_stop(self._pending, self.stop)
        self.finish_reason = STOP if stopped else None
        return ready

    def _end(self, reason: str) -> str:
        """The text held back, now that the completion ended for `reason`."""
        ready, _, stopped = split_at_stop(self._pending + self._decoder.flush(), self.stop, final=True)
        self.finish_reason = STOP if stopped else reason
        return ready


class Wakeups:
    """The engine reader threads' hand-over to one event loop: every step that delivered tokens to its
    streams makes one call_soon_threadsafe, which wakes every completion waiting there (each then
    takes what is ready, or waits again): one hand-over per step, instead of a thread per stream
    that wakes at every token (docs/serve.md's load benchmark compares the two)."""

    _by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Wakeups] = weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.waiting: list[asyncio.Future[None]] = []

    @classmethod
    def of_running_loop(cls) -> Wakeups:
        loop = asyncio.get_running_loop()
        if loop not in cls._by_loop:
            cls._by_loop[loop] = cls(loop)
        return cls._by_loop[loop]

    async def wait(self) -> None:
        future = self.loop.create_future()
        self.waiting.append(future)
        await future

    def wake(self) -> None:
        """Thread-safe: called by an engine's reader thread after a step."""
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
            self.loop.call_soon_threadsafe(self._wake_all)

    def _wake_all(self) -> None:
        waiting, self.waiting = self.waiting, []
        for future in waiting:
            if not future.done():  # a cancelled waiter (its client went away) is done
                future.set_result(None)


def split_at_stop(text: str, stop: Sequence[str], final: bool = False) -> tuple[str, str, bool]:
    """(text that can be sent, text held back, whether a stop text was met).

    Held back is the end of `text` that may be the beginning of a stop text, so a stop text that
    arrives over several tokens is never sent; at the end (`final`) nothing is held back.
    """
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    if found:
        return text[: min(found)], "", True
    if final:
        return text, "", False
    held = max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
    return text[: len(text) - held], text[len(text) - held :], False


class ServedModel:
    """A loaded run (or Hugging Face model) under a name, with its own batch scheduler."""

    def __init__(
        self,
        name: str,
        model: GPT,
        tokenizer: Tokenizer,
        scheduler: EngineProcess,
        max_tokens_limit: int,
        created: int,
    ):
        self.name, self.model, self.tokenizer, self.scheduler = name, model, tokenizer, scheduler
        self.block_size = model.config.block_size
        # the longest completion: the server's limit (--max-tokens-limit), not the context, which slides
        self.max_tokens_limit = max_tokens_limit
        self.created = created  # Unix time of the checkpoint (or of loading a Hugging Face model)
        is_chat = all(t in tokenizer.special_tokens for t in CHAT_TOKENS)
        self.chat = ChatFormat(tokenizer) if is_chat else None

    def encode(self, text: str) -> tuple[list[int], Unseen]:
        """Token ids of a prompt (an empty one means "a new document"), and the characters the model
        never saw, read as <|unk|>."""
        ids, unseen = self.tokenizer.encode_user_text(text)
        return ids.tolist() or [self.tokenizer.eot_id], unseen

    def fit_prompt(self, ids: list[int]) -> tuple[list[int], str | None]:
        """The prompt's last tokens that fit in the model's context, and a note when some were cut.

        The completion then slides the window along (as `smallgpt sample` does), however long it is.
        """
        if len(ids) <= self.block_size:
            return ids, None
        note = (
            f"the prompt has {len(ids)} tokens; only its last {self.block_size} were used "
            f"(the model's context)"
        )
        return ids[-self.block_size :], note

    def chat_prompt(self, conversation: Conversation, max_tokens: int) -> tuple[list[int], list[str]]:
        """The run's turn format for a conversation (`chat.format.turns_from_messages`), ending with
        the bot's marker, as `smallgpt chat` builds it (`ChatFormat.conversation_prompt`); and the
        notes for the response's `warnings`."""
        if self.chat is None:
            raise UserError(
                f"model {self.name!r} was not trained on chat data (no chat tokens): use /v1/completions"
            )
        return self.chat.conversation_prompt(conversation, self.block_size, max_tokens)

    def stop_ids(self, chat: bool) -> tuple[int, ...]:
        return self.chat.stop_ids if chat and self.chat else (self.tokenizer.eot_id,)

    def complete(
        self, prompt_ids: list[int], settings: SamplingSettings, stop: Sequence[str] = (), chat: bool = False
    ) -> Completion:
        """Queue one completion of `prompt_ids`, ending at the model's end-of-text (end-of-turn for a
        chat) or a `stop` text; QueueFull when the scheduler has no room."""
        stop_ids = self.stop_ids(chat)
        suppress_ids = suppressed_ids(self.tokenizer, self.model.config.vocab_size, stop_ids)
        settings = dataclasses.replace(settings, stop_ids=stop_ids, suppress_ids=suppress_ids)
        return Completion(self.scheduler.submit(prompt_ids, settings), self.tokenizer, list(stop))

    def stats(self) -> dict:
        """Requests now, and batching so far, for /health: steps, tokens, steps per batch size."""
        stats, (running, waiting) = self.scheduler.stats, self.scheduler.load
        return {
            "running": running,
            "waiting": waiting,
            "steps": stats.steps,
            "tokens": stats.tokens,
            "max_batch_size": stats.max_batch_size,
            "batch_sizes": {str(size): steps for size, steps in sorted(stats.batch_sizes.items())},
        }

    def describe(self) -> dict:
        """The model's entry in /v1/models (OpenAI's fields, and what the page needs)."""
        return {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "smallgpt",
            "chat": self.chat is not None,
            "block_size": self.block_size,
            "max_tokens": self.max_tokens_limit,
        }


def model_name(source: str) -> str:
    """A run (or Hugging Face folder) is served under its folder's name."""
    return Path(source.rstrip("/")).name or source


def load_models(
    runs: Sequence[str],
    init_from: str,
    which: str,
    device: torch.device,
    max_batch: int,
    max_queue: int,
    precision: Precision | None = None,
    compile: bool = False,
    *,
    max_tokens_limit: int,
) -> dict[str, ServedModel]:
    precision = precision or Precision()
    sources = [(run, "") for run in runs] + ([("", init_from)] if init_from else [])
    if not sources:
        raise UserError("pass at least one --run DIR (or --init-from)")
    models: dict[str, ServedModel] = {}
    for run, hf in sources:
        name = model_name(run or hf)
        if name in models:
            raise UserError(f"two models would be named {name!r}: serve runs whose folders differ in name")
        model, tokenizer = load_source(run, hf, which, device, precision.dtype, precision.quantize)
        created = find_checkpoint(run, which).stat().st_mtime if run else time.time()
        engine = EngineProcess(model, max_batch, max_queue, compile)
        models[name] = ServedModel(name, model, tokenizer, engine, max_tokens_limit, int(created))
    return models
