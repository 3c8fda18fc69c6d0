"""The one generation path: batched, KV-cached decoding with per-row positions and sampling settings.

`DecodeEngine` holds up to max_batch requests, each in its own slot of one KV cache. A step
prefills the requests that just joined (and any whose context slid past block_size) one at a
time, runs one forward for all the others together, and samples one token per request with that
request's settings and random generator: what a request gets does not depend on its batch.
`smallgpt sample`, `continue` and `chat` drive an engine through generate.Generator, the server
through serve/engine.py (an engine in a process of its own).

    engine = DecodeEngine(model, max_batch=8)
    request = engine.add(prompt_ids, SamplingSettings(temperature=0.8, seed=1))
    while engine.busy:
        for event in engine.step():  # Event(request, token_id, finish_reason)
            ...
"""

from __future__ import annotations

import math
import types
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from smallgpt.data.tokenizers import Tokenizer
from smallgpt.errors import UserError
from smallgpt.model.cache_slots import AllSlots
from smallgpt.model.gpt import GPT, KVCache

STOP, LENGTH, CANCELLED = "stop", "length", "cancelled"  # why a request ended
COMPILE_BACKEND = "inductor"  # torch.compile's; tests use a faster one


MAX_SEED = 2**63  # seeds are 0 .. 2**63 - 1


class SettingError(UserError):
    """A sampling setting of the wrong type or out of its range; `name` says which (the server's
    400 names it as its `param`)."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"{name} {problem}")
        self.name = name


@dataclass(frozen=True)
class SamplingSettings:
    """How one request picks its tokens; every row of a batch has its own. The one home of the
    sampling settings and their checks: sample, continue, chat, the Python API and the server."""

    max_new_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_k: int | None = None  # keep only the k most likely tokens
    top_p: float | None = None  # nucleus: the smallest set of tokens with this total probability
    repetition_penalty: float = 1.0  # above 1 makes tokens already in the context less likely
    stop_ids: tuple[int, ...] = ()  # the request ends with the first of these it produces
    suppress_ids: tuple[int, ...] = ()  # never produced: see `suppressed_ids`
    seed: int | None = None  # the request's own random generator; None: torch's global one

    def validate(self) -> None:
        """SettingError for a value of the wrong type (a string for a number) or out of its range."""
        if _number("max_new_tokens", self.max_new_tokens, whole=True) <= 0:
            raise SettingError("max_new_tokens", f"must be positive, got {self.max_new_tokens}")
        if _number("temperature", self.temperature) < 0:
            raise SettingError("temperature", f"must not be negative, got {self.temperature}")
        if self.top_k is not None and _number("top_k", self.top_k, whole=True) <= 0:
            raise SettingError("top_k", f"must be positive, got {self.top_k}")
        if self.top_p is not None and not 0 < _number("top_p", self.top_p) <= 1:
            raise SettingError("top_p", f"must be in (0, 1], got {self.top_p}")
        if _number("repetition_penalty", self.repetition_penalty) <= 0:
            raise SettingError("repetition_penalty", f"must be positive, got {self.repetition_penalty}")
        if self.seed is not None and not 0 <= _number("seed", self.seed, whole=True) < MAX_SEED:
            raise SettingError("seed", f"must be in [0, 2**63), got {self.seed}")


def _number(name: str, value: object, whole: bool = False) -> float:
    """`value` if it is a finite number (an int when `whole`; a bool is neither), else SettingError."""
    kinds: tuple[type, ...] = (int,) if whole else (int, float)
    number = isinstance(value, kinds) and not isinstance(value, bool)
    if not number or (isinstance(value, float) and not math.isfinite(value)):
        kind = "an integer" if whole else "a number"
        raise SettingError(name, f"must be {kind}, got {value!r}")
    return value  # type: ignore[return-value]


def suppressed_ids(tokenizer: Tokenizer, model_vocab_size: int, stop_ids: Sequence[int]) -> tuple[int, ...]:
    """The ids a model must never produce: special tokens other than the ones that end the text,
    and embedding rows past the tokenizer's vocabulary (e.g. GPT-2's 50257 padded to 50304), which
    have no text to decode to. The one rule of sample, continue, chat, the Python API and the server."""
    special = (i for i in tokenizer.special_tokens.values() if i not in stop_ids)
    return (*special, *range(tokenizer.vocab_size, model_vocab_size))


def check_request(vocab_size: int, prompt_ids: Sequence[int], settings: SamplingSettings) -> None:
    """Raise UserError for a request no engine of a model with this vocabulary can run."""
    settings.validate()
    if not prompt_ids:
        raise UserError("a prompt needs at least one token")
    ids = (*prompt_ids, *settings.stop_ids, *settings.suppress_ids)
    outside = [i for i in ids if not 0 <= i < vocab_size]
    if outside:
        raise UserError(f"token id {outside[0]} is outside the model's vocabulary of {vocab_size}")


@dataclass(eq=False)
class Request:
    """One sequence in an engine: `DecodeEngine.add` returns it as the caller's handle."""

    settings: SamplingSettings
    generator: torch.Generator | None
    context: list[int]  # the prompt, then every token generated
    generated: int = 0
    slot: int | None = None  # its row in the engine's KV cache while it runs
    finish_reason: str | None = None  # stop | length | cancelled, once it has ended


class Event(NamedTuple):
    """One new token of one request; finish_reason is set on its last (a stop id is included)."""

    request: Request
    token_id: int
    finish_reason: str | None


@dataclass
class EngineStats:
    steps: int = 0
    tokens: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)  # rows decoded together -> steps

    @property
    def max_batch_size(self) -> int:
        return max(self.batch_sizes, default=0)

    def copy(self) -> EngineStats:
        return EngineStats(self.steps, self.tokens, Counter(self.batch_sizes))


class DecodeEngine:
    """Batched decoding over a fixed number of slots; not thread-safe (serve.engine.EngineProcess is).

    use_cache=False recomputes each row's whole context every step (nanoGPT's algorithm: the
    reference the cache must match, and the speed baseline). compile=True runs the decoding forward
    through torch.compile, for all max_batch slots at once (fixed shapes: one compilation); the
    first step compiles it (seconds), later ones skip most of eager PyTorch's per-operation
    overhead, which is most of a small model's time per token (docs/benchmarks.md).
    """

    def __init__(self, model: GPT, max_batch: int = 8, use_cache: bool = True, compile: bool = False):
        if max_batch <= 0:
            raise UserError(f"max_batch must be positive, got {max_batch}")
        if compile and not use_cache:
            raise UserError("compile speeds up the KV-cached decoding step: it needs the cache")
        self.model, self.max_batch = model, max_batch
        self.block_size, self.vocab_size = model.config.block_size, model.config.vocab_size
        self.device, dtype = model.activations
        # a CPU attends in fp32 (model.gpt.attention): an fp32 cache spares casting it every layer
        cache_dtype = torch.float32 if self.device.type == "cpu" else dtype
        self.cache = KVCache(model.config, max_batch, self.device, cache_dtype) if use_cache else None
        self.decode_all = compile_decode_step() if compile else None
        self.slots: list[Request | None] = [None] * max_batch
        self.waiting: deque[Request] = deque()  # added, joining at the next step with a free slot
        self.stats = EngineStats()

    @property
    def active(self) -> list[Request]:
        return [request for request in self.slots if request is not None]

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(request is not None for request in self.slots)

    @property
    def free_slots(self) -> int:
        return self.slots.count(None) - len(self.waiting)

    def check(self, prompt_ids: Sequence[int], settings: SamplingSettings) -> None:
        """Raise UserError for a request this engine cannot run."""
        check_request(self.vocab_size, prompt_ids, settings)

    def add(
        self,
        prompt_ids: Sequence[int],
        settings: SamplingSettings,
        generator: torch.Generator | None = None,
    ) -> Request:
        """Queue a request; it joins the batch at the next step that has a free slot.

        generator, when given, is drawn from instead of one seeded with settings.seed (so that
        `sample`'s successive samples continue one random stream).
        """
        self.check(prompt_ids, settings)
        if generator is None and settings.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(settings.seed)
        request = Request(settings, generator, context=list(prompt_ids))
        self.waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """End a request now; its slot is free for the next step."""
        if request in self.waiting:
            self.waiting.remove(request)
        elif request.slot is not None:
            self.slots[request.slot] = None
            request.slot = None
        if request.finish_reason is None:
            request.finish_reason = CANCELLED

    @torch.no_grad()
    def step(self) -> list[Event]:
        """Admit waiting requests, then one new token for every running one."""
        self._admit()
        rows = [(slot, request) for slot, request in enumerate(self.slots) if request is not None]
        if not rows:
            return []
        logits = self._next_logits(rows)  # (B, vocab)
        picked = [self._pick(request, logits[i : i + 1]) for i, (_, request) in enumerate(rows)]
        token_ids = torch.cat(picked).tolist()  # one device sync for the whole batch
        self.stats.steps += 1
        self.stats.tokens += len(rows)
        self.stats.batch_sizes[len(rows)] += 1
        return [self._record(slot, request, token) for (slot, request), token in zip(rows, token_ids)]

    def generate(
        self,
        prompt_ids: Sequence[int],
        settings: SamplingSettings,
        generator: torch.Generator | None = None,
    ) -> Iterator[int]:
        """Run one request alone to its end, yielding its token ids; the engine must be idle."""
        if self.busy:
            raise RuntimeError("generate runs one request alone, but this engine is busy")
        request = self.add(prompt_ids, settings, generator)
        try:
            while request.finish_reason is None:
                for event in self.step():
                    yield event.token_id
        finally:
            self.cancel(request)  # the caller stopped reading early: free the slot

    def _admit(self) -> None:
        for slot, request in enumerate(self.slots):
            if request is None and self.waiting:
                joining = self.waiting.popleft()
                joining.slot, self.slots[slot] = slot, joining
                if self.cache is not None:
                    self.cache.lengths[slot] = 0  # whatever a previous request left there is stale

    def _next_logits(self, rows: list[tuple[int, Request]]) -> torch.Tensor:
        """Logits (B, vocab) for each row's next token: one forward for the rows that continue
        their slot, one each for rows that (re)fill theirs."""
        if self.cache is None:
            return self._recompute(rows)
        lengths = self.cache.lengths
        continuing = [row for row in rows if 0 < lengths[row[0]] < self.block_size]
        if len(continuing) == len(rows) and self.decode_all is None:
            return self._forward(rows, 1)  # the usual step: every row adds its last token
        by_slot = {}
        if continuing and self.decode_all is not None:
            by_slot = self._decode_all_slots(continuing)
        elif continuing:
            by_slot = dict(zip([slot for slot, _ in continuing], self._forward(continuing, 1)))
        for slot, request in rows:
            if slot not in by_slot:
                # a new row fills its slot with its last block_size ids; a full slot slides: it is
                # refilled with the last 3/4 block, so the next refill is a quarter block away
                keep = self.block_size if lengths[slot] == 0 else 3 * self.block_size // 4
                lengths[slot] = 0
                by_slot[slot] = self._forward([(slot, request)], keep)[0]
        return torch.stack([by_slot[slot] for slot, _ in rows])

    def _forward(self, rows: list[tuple[int, Request]], keep: int) -> torch.Tensor:
        """Feed the last `keep` ids of each row's context (all rows as long); logits (B, vocab)."""
        ids = [request.context[-keep:] for _, request in rows]
        idx = torch.tensor(ids, dtype=torch.long, device=self.device)
        cache = self.cache.select([slot for slot, _ in rows]) if self.cache is not None else None
        logits, _ = self.model(idx, kv_cache=cache)  # (B, 1, vocab)
        return logits[:, -1, :].float()

    def _recompute(self, rows: list[tuple[int, Request]]) -> torch.Tensor:
        """No cache (nanoGPT's algorithm): the last block_size ids of every row in one forward,
        logits (B, vocab). Shorter rows are padded at their end, which causal attention hides from
        their real positions: each row's logits are those of its last real one."""
        contexts = [request.context[-self.block_size :] for _, request in rows]
        width = max(map(len, contexts))
        idx = torch.tensor([ids + [0] * (width - len(ids)) for ids in contexts], device=self.device)  # (B, T)
        last = torch.tensor([len(ids) - 1 for ids in contexts], device=self.device)
        hidden = self.model.hidden_states(idx)[torch.arange(len(rows), device=self.device), last]  # (B, C)
        return self.model.lm_head(hidden).float()

    def _decode_all_slots(self, continuing: list[tuple[int, Request]]) -> dict[int, torch.Tensor]:
        """The compiled step: every slot decodes one token; the logits of the continuing rows."""
        assert self.cache is not None and self.decode_all is not None
        lengths, last = self.cache.lengths, self.block_size - 1
        ids, positions = [0] * self.max_batch, [min(n, last) for n in lengths]  # idle slots: harmless
        for slot, request in continuing:
            ids[slot] = request.context[-1]
        idx = torch.tensor(ids, device=self.device)[:, None]  # (S, 1)
        logits = self.decode_all(self.model, self.cache, idx, torch.tensor(positions, device=self.device))
        for slot, _ in continuing:
            lengths[slot] += 1
        return {slot: logits[slot] for slot, _ in continuing}

    def _pick(self, request: Request, logits: torch.Tensor) -> torch.Tensor:
        """The request's next token id (1,) from its logits (1, vocab), with its own settings."""
        s = request.settings
        if s.suppress_ids:
            logits[:, list(s.suppress_ids)] = float("-inf")
        if s.repetition_penalty != 1.0:
            context = torch.tensor([request.context], device=logits.device)
            logits = penalize_repeats(logits, context, s.repetition_penalty)
        return sample_next(logits, s.temperature, s.top_k, s.top_p, request.generator)

    def _record(self, slot: int, request: Request, token_id: int) -> Event:
        request.context.append(token_id)
        request.generated += 1
        if token_id in request.settings.stop_ids:
            request.finish_reason = STOP
        elif request.generated >= request.settings.max_new_tokens:
            request.finish_reason = LENGTH
        if request.finish_reason is not None:
            self.slots[slot] = None
            request.slot = None
        return Event(request, token_id, request.finish_reason)


def _decode_all_slots(model: GPT, cache: KVCache, idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Logits (S, vocab) of one new token per cache slot (idx (S, 1) at positions (S,))."""
    logits, _ = model(idx, kv_cache=AllSlots(cache, positions))
    return logits[:, -1, :].float()


def compile_decode_step() -> Callable[[GPT, KVCache, torch.Tensor, torch.Tensor], torch.Tensor]:
    """`_decode_all_slots` through torch.compile, for one engine (one model) only.

    torch.compile keeps its compiled graphs on the function's code object, so each engine compiles
    its own copy: a graph never serves another engine's model. That is what makes it safe to skip
    the guards on the model's modules and parameters, which are checked on every call and cost a
    noticeable share of a small model's step (docs/benchmarks.md): an engine's model never changes.
    """
    code = _decode_all_slots.__code__.replace()  # an equal code object of its own
    step = types.FunctionType(code, _decode_all_slots.__globals__, _decode_all_slots.__name__)
    options: dict[str, str | int | bool | Callable[..., Any]] = {
        "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe
    }
    return torch.compile(step, backend=COMPILE_BACKEND, dynamic=False, options=options)


def penalize_repeats(logits: torch.Tensor, context: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty: make tokens already in the context less likely (logits (B, V))."""
    seen = torch.gather(logits, 1, context)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, context, seen)


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One token id per row from logits (B, V) with temperature, top-k and nucleus (top-p) filters."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    # torch.multinomial's own way to draw one sample (the same ids from the same generator), without
    # its checks of the probabilities, which cost more than the draw itself (docs/benchmarks.md)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)
