"""A decode engine in a process of its own, for the server's concurrent requests.

In one process, the decoding thread and the server's event loop take turns at the GIL: under 8
streaming clients the whole server used one of two cores (docs/serve.md). Here the engine's process
decodes while the server's loop runs: `EngineProcess.submit` sends a request over a pipe and
returns a `TokenStream` at once; each decode step comes back as one message, which a reader thread
hands to the streams.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from multiprocessing.connection import Connection
from typing import Any

import torch

from smallgpt.decode import CANCELLED, DecodeEngine, EngineStats, Request, SamplingSettings, check_request
from smallgpt.errors import UserError
from smallgpt.model.gpt import GPT


class QueueFull(Exception):
    """The scheduler's queue of requests waiting for a slot is full: try again later (HTTP 503)."""


class TokenStream:
    """The token ids of one submitted request as a blocking iterator (a stop id ends it, included).

    finish_reason is set once it has ended: stop | length | cancelled (closed, or the scheduler
    stopped). close() (or leaving a `with` block) cancels the request and frees its slot. A reader
    that must not block (an event loop) sets `notify` and calls take_ready() when it is called.
    """

    def __init__(self, scheduler: EngineProcess, prompt_ids: list[int], settings: SamplingSettings):
        self._scheduler, self.prompt_ids, self.settings = scheduler, prompt_ids, settings
        self._items: queue.SimpleQueue[int | str | BaseException] = queue.SimpleQueue()
        self.finish_reason: str | None = None
        self.request_id = -1  # the scheduler's number for it
        # Called on the scheduler's reader thread once per step that delivered to it (or ended it).
        # Streams sharing one callable share one call per step: one hand-over to their reader.
        self.notify: Callable[[], None] | None = None

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> int:
        while self.finish_reason is None:
            token_id = self._accept(self._items.get())
            if token_id is not None:
                return token_id
        raise StopIteration

    def take_ready(self) -> list[int]:
        """The token ids delivered so far and not yet read, without waiting; finish_reason is set
        once the end has been read."""
        ids: list[int] = []
        while self.finish_reason is None:
            try:
                item = self._items.get_nowait()
            except queue.Empty:
                break
            if (token_id := self._accept(item)) is not None:
                ids.append(token_id)
        return ids

    def _accept(self, item: int | str | BaseException) -> int | None:
        """A token id read from the queue, or None for its end (which sets finish_reason)."""
        if isinstance(item, int):
            return item
        if isinstance(item, BaseException):
            self.finish_reason = CANCELLED
            raise RuntimeError("decoding failed") from item
        self.finish_reason = item
        return None

    def put(self, item: int | str | BaseException) -> None:
        self._items.put(item)

    def close(self) -> None:
        if self.finish_reason is None:
            self.finish_reason = CANCELLED
            self._scheduler.cancel(self)

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def deliver(
    running: dict[Any, TokenStream], events: Iterable[tuple[Any, int, str | None]]
) -> list[TokenStream]:
    """Put each event's token (and end) into the stream of its request in `running` (a request
    that ended leaves it); returns the streams that got something."""
    delivered = []
    for key, token_id, finish_reason in events:
        stream = running.get(key)
        if stream is None:
            continue
        stream.put(token_id)
        delivered.append(stream)
        if finish_reason is not None:
            stream.put(finish_reason)
            del running[key]
    return delivered


def notify_readers(streams: list[TokenStream]) -> None:
    """Each distinct `notify` of the streams, once."""
    for notify in {stream.notify for stream in streams if stream.notify is not None}:
        notify()


class EngineProcess:
    """A DecodeEngine in a process of its own for concurrent callers (the server): submit() is
    thread-safe and returns a TokenStream at once; stop() ends the process and every open stream.

    Requests and cancels go to the process over a pipe, and each step comes back as one message of
    (request id, token id, finish reason) and the engine's stats, which a reader thread hands to the
    streams. Requests beyond max_batch wait in the engine's queue; QueueFull once max_queue of them
    wait.
    """

    def __init__(self, model: GPT, max_batch: int = 8, max_queue: int = 64, compile: bool = False):
        if max_batch <= 0:
            raise UserError(f"max_batch must be positive, got {max_batch}")
        self.vocab_size, self.max_batch, self.max_queue = model.config.vocab_size, max_batch, max_queue
        context = multiprocessing.get_context("spawn")  # a forked child would inherit OpenMP's threads
        self._commands, child_commands = context.Pipe()
        self._events, child_events = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_run_engine,
            args=(model, max_batch, compile, child_commands, child_events),
            name="smallgpt-engine",
            daemon=True,
        )
        self._process.start()
        child_commands.close()
        child_events.close()
        self._lock = threading.Lock()  # guards everything below and sending commands
        self._running: dict[int, TokenStream] = {}  # submitted and not ended, by request id
        self._ids = itertools.count()
        self._stats = EngineStats()
        self._failure: BaseException | None = None
        self._stopping = False
        self._reader = threading.Thread(target=self._read, name="smallgpt-engine-reader", daemon=True)
        self._reader.start()

    def submit(
        self, prompt_ids: Sequence[int], settings: SamplingSettings, notify: Callable[[], None] | None = None
    ) -> TokenStream:
        """Queue a request; iterate the returned stream for its token ids (or set `notify`, here
        before its first token, and take them). UserError for a bad request, QueueFull when
        max_queue requests already wait."""
        check_request(self.vocab_size, prompt_ids, settings)
        stream = TokenStream(self, list(prompt_ids), settings)
        stream.notify = notify
        with self._lock:
            if self._stopping or self._failure is not None:
                raise RuntimeError("the scheduler has stopped")
            waiting = len(self._running) - self.max_batch
            if waiting >= self.max_queue:
                raise QueueFull(f"{waiting} requests are already waiting")
            stream.request_id = next(self._ids)
            try:
                self._commands.send(("add", stream.request_id, stream.prompt_ids, settings))
            except OSError:  # the process died and the reader has not yet seen it end
                raise RuntimeError("the scheduler has stopped") from None
            self._running[stream.request_id] = stream
        return stream

    def cancel(self, stream: TokenStream) -> None:
        with self._lock:
            if self._running.pop(stream.request_id, None) is not None and self._failure is None:
                # a process that has ended needs no cancel: the reader ends the stream anyway
                with contextlib.suppress(OSError):
                    self._commands.send(("cancel", stream.request_id))

    @property
    def stats(self) -> EngineStats:
        with self._lock:
            return self._stats.copy()

    @property
    def load(self) -> tuple[int, int]:
        """(requests running, requests waiting for a slot)."""
        with self._lock:
            return min(len(self._running), self.max_batch), max(len(self._running) - self.max_batch, 0)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            with contextlib.suppress(OSError):
                self._commands.send(("stop",))
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
        self._reader.join(timeout=30)

    def _read(self) -> None:
        """The reader thread: every step's tokens to their streams, until the engine's process ends."""
        while True:
            try:
                message = self._events.recv()
            except (EOFError, OSError):  # the process ended: stopped, or died
                message = ("ended", "the decoding process ended")
            if message[0] != "step":
                self._end_all(message[1])
                return
            _, events, stats = message
            with self._lock:
                delivered = deliver(self._running, events)
                self._stats = stats
            notify_readers(delivered)

    def _end_all(self, message: str) -> None:
        """The engine's process ended: open streams end as cancelled after stop(), else as failed."""
        with self._lock:
            reason: str | BaseException = CANCELLED
            if not self._stopping:
                self._failure = reason = RuntimeError(message)
            ended = list(self._running.values())
            for stream in ended:
                stream.put(reason)
            self._running.clear()
        notify_readers(ended)


def _run_engine(model: GPT, max_batch: int, compile: bool, commands: Connection, events: Connection) -> None:
    """EngineProcess's child: apply commands (waiting for one while idle), then step and send."""
    try:
        engine = DecodeEngine(model, max_batch, compile=compile)
        requests: dict[int, Request] = {}
        ids: dict[Request, int] = {}
        with torch.inference_mode():
            while True:
                while commands.poll(0 if engine.busy else None):
                    command, *args = commands.recv()
                    if command == "stop":
                        return
                    if command == "add":
                        request_id, prompt_ids, settings = args
                        requests[request_id] = engine.add(prompt_ids, settings)
                        ids[requests[request_id]] = request_id
                    elif (request := requests.pop(args[0], None)) is not None:  # cancel
                        engine.cancel(request)
                        ids.pop(request)
                stepped = []
                for event in engine.step():
                    stepped.append((ids[event.request], event.token_id, event.finish_reason))
                    if event.finish_reason is not None:
                        del requests[ids.pop(event.request)]
                events.send(("step", stepped, engine.stats))
    except (EOFError, OSError, KeyboardInterrupt):  # the server went away or is stopping
        return
    except BaseException as error:  # a bug: every caller sees it rather than waiting forever
        events.send(("failed", f"the decoding process failed: {error!r}"))
        raise
