"""The Python API: `smallgpt.load`, `smallgpt.train` and `smallgpt.prepare` (see docs/python-api.md).

Thin calls over what the CLI verbs run, nothing implemented twice: a model is loaded by
runs.load_source and generates through generate.Generator (`sample`, `continue` and `chat` use it
too), `score` is `smallgpt eval`'s score_documents, `chat` is `smallgpt chat`'s session, `train` is
`smallgpt train`'s train(config) and `prepare` is `smallgpt prepare`'s run_prepare. Heavy modules
(torch) are imported on first use, so `import smallgpt` stays quick.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from smallgpt.errors import UserError

if TYPE_CHECKING:
    from smallgpt.config import Config
    from smallgpt.data.tokenizers import Tokenizer
    from smallgpt.generate import Generator
    from smallgpt.model.gpt import GPT


class Model:
    """A loaded model (a run's checkpoint, or Hugging Face weights) and its tokenizer.

    Sampling defaults are those of `smallgpt continue` (generate, stream) and `smallgpt chat`;
    `seed=None` draws fresh randomness, a seed makes the text reproducible. One call at a time:
    for concurrent requests, serve the model (`smallgpt serve`), which batches them.
    """

    def __init__(self, generator: Generator, name: str):
        self._generator = generator
        self.name = name

    @property
    def model(self) -> GPT:
        return self._generator.model

    @property
    def tokenizer(self) -> Tokenizer:
        return self._generator.tokenizer

    def __repr__(self) -> str:
        return f"smallgpt.Model({self.name!r}, block_size={self.model.config.block_size})"

    def _sampling(self, seed: int | None, **settings: Any) -> Generator:
        """The generator, set up for one call."""
        options = dataclasses.replace(self._generator.options, **settings)
        dataclasses.replace(options.settings(), seed=seed).validate()  # every setting's one check
        self._generator.options = options
        if seed is None:
            self._generator.rng.seed()
        else:
            self._generator.rng.manual_seed(seed)
        return self._generator

    def stream(
        self,
        prompt: str = "",
        *,
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = 200,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Text pieces of the continuation of `prompt` as they are generated (the prompt is not
        repeated); ends at end-of-text or after max_new_tokens. An empty prompt starts a new document."""
        generator = self._sampling(
            seed,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
        )
        return generator.text_stream(generator.encode_prompt(prompt, _warn))

    def generate(
        self,
        prompt: str = "",
        *,
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = 200,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
    ) -> str:
        """The continuation of `prompt` (without the prompt): `stream`'s pieces joined."""
        return "".join(
            self.stream(
                prompt,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                repetition_penalty=repetition_penalty,
                seed=seed,
            )
        )

    def score(self, text: str, stride: int | None = None) -> dict[str, float]:
        """How well the model predicts `text`, scored as `smallgpt eval` scores a document: loss
        (nats/token), perplexity, bits_per_byte, tokens, and unknown_chars: the characters the model
        never saw, each scored as <|unk|>. stride: see `smallgpt eval --stride`."""
        from smallgpt.evaluate import score_documents

        score = score_documents(self.model, self.tokenizer, [text], stride, name=self.name)
        return {
            "loss": score.loss,
            "perplexity": score.perplexity,
            "bits_per_byte": score.bits_per_byte,
            "tokens": score.tokens,
            "unknown_chars": score.unknown_chars or 0,  # None: a tokenizer that encodes every text
        }

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        max_new_tokens: int | None = None,
        temperature: float = 0.8,
        top_k: int | None = 50,
        top_p: float | None = None,
        repetition_penalty: float = 1.1,
        seed: int | None = None,
    ) -> str:
        """The reply of a chat run to OpenAI-style messages, the last one the user's:
        [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}, {"role":
        "assistant", ...}, ...]; content is a text or a list of {"type": "text", "text": ...} parts.
        The system message and the most recent turns that fit next to the reply are the model's
        context, as in `smallgpt chat`. max_new_tokens None: half the context, at most 128.
        Characters the model never saw are read as <|unk|>, with a warning. A run that was not
        trained on chat data raises UserError."""
        from smallgpt.chat.format import default_reply_tokens, turns_from_messages
        from smallgpt.chat.repl import ChatSession

        conversation = turns_from_messages(messages)
        if max_new_tokens is None:
            max_new_tokens = default_reply_tokens(self.model.config.block_size)
        generator = self._sampling(
            seed,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
        )
        return ChatSession(generator, _warn).reply_to(conversation)


def _warn(note: str) -> None:
    """A note for the caller (e.g. characters the model never saw), as a UserWarning at their line
    of code: the first frame outside smallgpt."""
    frame: FrameType | None = sys._getframe(1)
    level = 2
    while frame is not None and frame.f_globals.get("__name__", "").startswith("smallgpt"):
        frame, level = frame.f_back, level + 1
    warnings.warn(note, stacklevel=level)


def load(
    source: str | Path,
    checkpoint: str = "best",
    device: str = "auto",
    dtype: str = "float32",
    quantize: str = "none",
    compile: bool = False,
) -> Model:
    """A model to generate with, score texts with or chat with.

    source: a run folder (made by `smallgpt train`), a Hugging Face folder (config.json and
    model.safetensors) or a hub name: gpt2, gpt2-medium, gpt2-large, gpt2-xl. checkpoint: a run's
    best (lowest val loss) or last. device: auto, cpu, cuda, cuda:N or mps. dtype (float32,
    bfloat16, float16), quantize (none, int8) and compile: as `smallgpt sample`'s flags.
    """
    from smallgpt.generate import Generator, SamplingOptions
    from smallgpt.model.hub import HUB_MODELS

    source = str(source)
    hugging_face = source in HUB_MODELS or (Path(source) / "config.json").is_file()
    options = SamplingOptions(
        checkpoint=checkpoint,
        device=device,
        init_from=source if hugging_face else "",
        dtype=dtype,
        quantize=quantize,
        compile=compile,
    )
    return Model(Generator("" if hugging_face else source, options), source)


def train(config: str | Path | Config | None = None, **overrides: Any) -> Path:
    """Train a model, as `smallgpt train CONFIG --key=value ...` does; returns the run folder.

    config: a YAML or nanoGPT-style .py config file, a Config, or None for the defaults.
    overrides: config keys, flat (n_layer=4, max_iters=500) or by section (model={"n_layer": 4}).
    """
    from smallgpt.config import Config, apply_values, load_config
    from smallgpt.train.run import train as run_training

    config = copy.deepcopy(config) if isinstance(config, Config) else load_config(config)
    apply_values(config, overrides, "the keyword arguments")
    run_training(config)
    return Path(config.train.out_dir)


def prepare(source: str | Path, out: str | Path, **options: Any) -> Path:
    """Tokenize a corpus into a data folder, as `smallgpt prepare` does; returns `out`.

    source: a text file, a folder of them, or a named corpus (tinyshakespeare, shakespeare,
    tinystories, tinystories-instruct). options: `smallgpt prepare`'s flags as keywords, e.g.
    tokenizer="gpt2", val_fraction=0.05, format="chat", block_size=64.
    """
    from smallgpt.preparation import PrepareArgs, run_prepare

    known = {f.name for f in dataclasses.fields(PrepareArgs)} - {"source", "input", "out"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(
            f"prepare() got unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    run_prepare(PrepareArgs(source=str(source), out=str(out), **options))
    return Path(out)
