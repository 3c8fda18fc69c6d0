"""`smallgpt sample` and `smallgpt continue`: text from a trained run, streamed as it is made."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TextIO

import torch

from smallgpt.data.tokenizers import Tokenizer
from smallgpt.decode import DecodeEngine, SamplingSettings, suppressed_ids
from smallgpt.device import resolve_device
from smallgpt.errors import UserError
from smallgpt.io import read_user_text
from smallgpt.runs import Precision, load_source


def print_note(line: str) -> None:
    """What the CLI's verbs tell the user without stopping (e.g. characters the model never saw)."""
    print(f"note: {line}", file=sys.stderr)


class StreamDecoder:
    """Turns token ids into text pieces; holds back ids that end inside a multi-byte character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.pending: list[int] = []

    def push(self, token_id: int) -> str:
        self.pending.append(token_id)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < 8:
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return text


@dataclass
class SamplingOptions(Precision):
    max_new_tokens: int = field(default=500, metadata={"help": "tokens to generate per sample"})
    temperature: float = field(
        default=0.8,
        metadata={"help": "1.0 = the model's distribution, lower = more conservative, 0 = greedy"},
    )
    top_k: int | None = field(
        default=200, metadata={"help": "keep only the k most likely tokens (none: off)"}
    )
    top_p: float | None = field(
        default=None,
        metadata={"help": "nucleus sampling: keep the smallest set with this total probability"},
    )
    repetition_penalty: float = field(
        default=1.0, metadata={"help": "above 1 makes tokens already in the context less likely"}
    )
    seed: int = field(default=1337, metadata={"help": "random seed, for reproducible samples"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N | mps"})
    checkpoint: str = field(default="best", metadata={"help": "which checkpoint of the run: best | last"})
    kv_cache: bool = field(
        default=True,
        metadata={"help": "reuse past keys/values (faster; --no-kv-cache to turn off)"},
    )
    compile: bool = field(
        default=False,
        metadata={"help": "torch.compile the decoding step: compiling takes ~10 s, then tokens come faster"},
    )
    init_from: str = field(
        default="",
        metadata={
            "help": "instead of --run: gpt2, gpt2-medium, gpt2-large, gpt2-xl or a transformers folder"
        },
    )

    def validate(self) -> None:
        self.settings().validate()

    def settings(
        self, stop_ids: tuple[int, ...] = (), suppress_ids: tuple[int, ...] = ()
    ) -> SamplingSettings:
        """The decode engine's settings for one request (its randomness comes from the Generator)."""
        return SamplingSettings(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            stop_ids=stop_ids,
            suppress_ids=suppress_ids,
        )


@dataclass
class SampleArgs(SamplingOptions):
    run: str = field(default="", metadata={"help": "run folder made by smallgpt train (or --init-from)"})
    start: str = field(
        default="\n", metadata={"help": "text to start from, or FILE:path to read it from a file"}
    )
    num_samples: int = field(default=10, metadata={"help": "how many samples to print"})


class Generator:
    """A loaded run that continues text, token by token."""

    def __init__(self, run: str, options: SamplingOptions):
        options.validate()
        self.options = options
        self.device = resolve_device(options.device)
        self.model, self.tokenizer = load_source(
            run, options.init_from, options.checkpoint, self.device, options.dtype, options.quantize
        )
        self.rng = torch.Generator(device=self.device).manual_seed(options.seed)  # shared by all samples
        self.engine = DecodeEngine(
            self.model, max_batch=1, use_cache=options.kv_cache, compile=options.compile
        )

    def encode_prompt(self, text: str, notice: Callable[[str], None] | None = None) -> list[int]:
        """Ids of a prompt; characters the model never saw are read as <|unk|> and reported to
        `notice` (default: a note on stderr)."""
        ids, unseen = self.tokenizer.encode_user_text(text)
        if note := unseen.note():
            (notice or print_note)(note)
        return ids.tolist() or [self.tokenizer.eot_id]  # an empty start means "a new document"

    def stream(self, ids: Sequence[int], stop_ids: tuple[int, ...] | None = None) -> Iterator[int]:
        """Yield new token ids after `ids`, ending with end-of-text (or one of the given stop ids)."""
        stop_ids = (self.tokenizer.eot_id,) if stop_ids is None else stop_ids
        settings = self.options.settings(
            stop_ids, suppressed_ids(self.tokenizer, self.model.config.vocab_size, stop_ids)
        )
        yield from self.engine.generate(ids, settings, self.rng)

    def text_stream(
        self, ids: Sequence[int], stop_ids: tuple[int, ...] | None = None, new_ids: list[int] | None = None
    ) -> Iterator[str]:
        """The continuation of `ids` as text pieces, until end-of-text (or a given stop id, not
        included); each new id is also appended to `new_ids` when given."""
        stop_ids = (self.tokenizer.eot_id,) if stop_ids is None else stop_ids
        decoder = StreamDecoder(self.tokenizer)
        for token_id in self.stream(ids, stop_ids):
            if token_id in stop_ids:
                break
            if new_ids is not None:
                new_ids.append(token_id)
            if piece := decoder.push(token_id):
                yield piece
        if tail := decoder.flush():
            yield tail

    def write_stream(self, ids: Sequence[int], out: TextIO) -> list[int]:
        """Stream a continuation of `ids` to `out`; returns the new ids (end-of-text excluded)."""
        new: list[int] = []
        for piece in self.text_stream(ids, new_ids=new):
            out.write(piece)
            out.flush()
        return new


def read_start(start: str) -> str:
    if not start.startswith("FILE:"):
        return start
    return read_user_text(start[len("FILE:") :], "start file")


def sample(args: SampleArgs, out: TextIO | None = None) -> None:
    """Print num_samples continuations of the start text, like nanoGPT's sample.py."""
    out = out or sys.stdout
    if args.num_samples <= 0:
        raise UserError(f"num-samples must be positive, got {args.num_samples}")
    gen = Generator(args.run, args)
    start = read_start(args.start)
    ids = gen.encode_prompt(start)
    for _ in range(args.num_samples):
        out.write(start)
        gen.write_stream(ids, out)
        out.write("\n---------------\n")
        out.flush()


@dataclass
class ContinueArgs(SamplingOptions):
    run: str = field(default="", metadata={"help": "run folder made by smallgpt train (or --init-from)"})
    max_new_tokens: int = field(default=200, metadata={"help": "tokens to generate per continuation"})


def interactive_continue(
    args: ContinueArgs, read: Callable[[str], str] = input, out: TextIO | None = None
) -> None:
    """Type a beginning; the model continues it; then [c]ontinue, [n]ew start or [q]uit."""
    out = out or sys.stdout
    gen = Generator(args.run, args)
    out.write("Type the beginning of a text (empty line: a new document). Ctrl-D quits.\n")
    try:
        while True:
            start = read("start> ")
            try:
                context = gen.encode_prompt(start)
            except UserError as e:  # e.g. a character a nanoGPT vocabulary has no id for: say so, ask again
                out.write(f"error: {e}\n")
                continue
            out.write(start)
            while True:
                context += gen.write_stream(context, out)
                out.write("\n")
                choice = read("[c]ontinue, [n]ew start, [q]uit? ").strip().lower()
                if choice.startswith("q"):
                    return
                if choice.startswith("n"):
                    break
    except (EOFError, KeyboardInterrupt):
        out.write("\n")
