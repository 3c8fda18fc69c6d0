"""GGUF interop: a smallgpt run out as one file that llama.cpp, ollama and LM Studio load.

The weights take the same road as the Hugging Face export (model/hf.py: architecture, zero biases,
split q/k/v and gate/up) and then get GGUF's names, which the `gguf` package maps from Hugging
Face's; two things differ from the HF files:
  * llama.cpp's `llama` rotates adjacent pairs of a head's vector, smallgpt (and Hugging Face) its
    first and second halves, so the rows of q and k are interleaved to give the same attention;
  * GGUF keeps nn.Linear's (out, in) layout, so GPT-2's Conv1D transposes are not applied.
The tied head is not written: both architectures fall back to the token embedding without one.
The tokenizer travels inside the file:
  gpt2, bpe:N: llama.cpp's byte-level BPE (`gpt2` model, GPT-2's pre-tokenizer), same tokens and merges;
  char: llama.cpp's unigram tokenizer (`t5` model) with one token per character: it splits text into
      exactly those characters and gives an unseen one the <|unk|> id, as smallgpt does (its
      SentencePiece `llama` model would spell an unseen character as byte tokens the model lacks).
Special tokens are control tokens; the caller (export.py) adds a chat run's Jinja chat template.
The `gguf` package (the GGML project's writer) is imported only here, when exporting.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smallgpt.data.tokenizers import EOT, UNK, BPETokenizer, CharTokenizer, Tokenizer, gpt2_files
from smallgpt.errors import UserError
from smallgpt.model import hf
from smallgpt.model.gpt import NORM_EPS, ModelConfig

DTYPES = ("f32", "f16", "q8_0")  # --dtype: float32, float16 or 8-bit blocks (llama.cpp's Q8_0)
SPACE = "\u2581"  # SentencePiece's visible space: llama.cpp's unigram tokenizer matches it for " "


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise UserError("GGUF export needs the gguf package: pip install 'smallgpt[gguf]'") from None
    return gguf


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def interleave_rope_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """q or k rows (or bias) from half-split rotary order (x1..xn/2, y1..yn/2 per head) to the
    adjacent pairs (x1, y1, x2, y2, ...) llama.cpp's `llama` rotates, as its own converter does."""
    shape = weight.shape
    return weight.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def gguf_tensors(weights: dict[str, torch.Tensor], config: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """A checkpoint's weights under GGUF's names, in llama.cpp's layout (float32)."""
    gguf = _gguf()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.n_layer)
    out = {}
    for key, tensor in hf.with_zero_biases(weights, config, arch).items():
        hf_names, _ = hf.hf_names(arch, key)  # the Conv1D transpose is Hugging Face's alone
        for hf_name, part in zip(hf_names, tensor.chunk(len(hf_names), dim=0)):
            if hf_name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
                part = interleave_rope_rows(part, config.n_head)
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ValueError(f"gguf has no name for {hf_name}")
            out[name] = part.float().contiguous()
    return out


def _encode(gguf: Any, tensor: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """The tensor's data and GGML type: norms and biases (1-D) stay float32 and rows that Q8_0's
    32-value blocks do not divide are float16, as llama.cpp's own converter writes them."""
    data = tensor.numpy()
    types = gguf.GGMLQuantizationType
    if data.ndim == 1 or dtype == "f32":
        return data, types.F32
    if dtype == "f16" or data.shape[-1] % gguf.GGML_QUANT_SIZES[types.Q8_0][0]:
        return data.astype(np.float16), types.F16
    return gguf.quants.quantize(data, types.Q8_0), types.Q8_0


# ---- the tokenizer -------------------------------------------------------------------------------


def _bpe_vocab(tokenizer: Tokenizer) -> tuple[list[str], list[str]]:
    """Tokens in GPT-2's byte-to-unicode spelling, ordered by id, and the merges, highest rank first."""
    if tokenizer.kind == "gpt2":
        encoder = json.loads((gpt2_files() / "encoder.json").read_text(encoding="utf-8"))
        merges = (gpt2_files() / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]  # #version
        return sorted(encoder, key=encoder.__getitem__), [m for m in merges if m]
    assert isinstance(tokenizer, BPETokenizer)
    hf_tok = tokenizer.to_dict()["tokenizer"]
    split = hf_tok.get("pre_tokenizer") or {}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    if any(split.get(k) != v for k, v in byte_level.items()) or hf_tok.get("normalizer"):
        raise UserError(
            "cannot export this bpe tokenizer to GGUF: llama.cpp's BPE needs a byte-level vocabulary "
            "with GPT-2's split (a ByteLevel pre-tokenizer, no prefix space, no normalizer)"
        )
    vocab = hf_tok["model"]["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in hf_tok["model"]["merges"]]
    return [*sorted(vocab, key=vocab.__getitem__), EOT], merges


def _char_vocab(tokenizer: CharTokenizer) -> list[str]:
    if SPACE in tokenizer.chars and " " in tokenizer.chars:
        raise UserError(
            f"cannot export this char tokenizer to GGUF: it has both ' ' and {SPACE!r}, which llama.cpp "
            "reads as the same character"
        )
    chars = [tokenizer.decode_ordinary([i]) for i in range(tokenizer.ordinary_vocab_size)]
    return [SPACE if c == " " else c for c in chars]


def _token_types(gguf: Any, tokens: list[str], tokenizer: Tokenizer) -> list[int]:
    kinds = gguf.TokenType
    special = set(tokenizer.special_tokens.values())
    unk = tokenizer.special_tokens.get(UNK)
    return [
        kinds.UNKNOWN if i == unk else kinds.CONTROL if i in special else kinds.NORMAL
        for i in range(len(tokens))
    ]


def add_tokenizer(writer: Any, tokenizer: Tokenizer, vocab_size: int) -> None:
    """The vocabulary (padded with unused tokens to the model's vocab_size) and its special ids."""
    gguf = _gguf()
    if tokenizer.kind in ("gpt2", "bpe"):
        tokens, merges = _bpe_vocab(tokenizer)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_merges(merges)
    elif isinstance(tokenizer, CharTokenizer):
        tokens = _char_vocab(tokenizer)
        writer.add_tokenizer_model("t5")
        writer.add_add_space_prefix(False)  # no dummy leading space before the text
        writer.add_remove_extra_whitespaces(False)
        writer.add_token_scores([0.0] * vocab_size)
        # nanoGPT's vocabulary has no <|unk|> (smallgpt refuses its unseen characters); llama.cpp
        # would read them as id 2, its T5 default, so they become <|endoftext|> instead
        writer.add_unk_token_id(tokenizer.eot_id if tokenizer.unk_id is None else tokenizer.unk_id)
    else:
        raise UserError(f"cannot export a {tokenizer.kind} tokenizer to GGUF")
    tokens += [name for _, name in sorted(tokenizer.added_tokens().items())]
    if len(tokens) != tokenizer.vocab_size:
        raise ValueError(f"{len(tokens)} tokens for a vocabulary of {tokenizer.vocab_size}")
    types = _token_types(gguf, tokens, tokenizer)
    padding = vocab_size - len(tokens)  # rows the model has beyond the tokenizer's (e.g. 50304)
    writer.add_token_list(tokens + [f"[PAD{i}]" for i in range(padding)])
    writer.add_token_types(types + [gguf.TokenType.UNUSED] * padding)
    writer.add_bos_token_id(tokenizer.eot_id)  # a document starts after one, as in training
    writer.add_eos_token_id(tokenizer.eot_id)
    writer.add_add_bos_token(False)  # the prompt is the text's own ids, as in smallgpt
    writer.add_add_eos_token(False)


# ---- the file ------------------------------------------------------------------------------------


def add_hyperparameters(writer: Any, config: ModelConfig, arch: str) -> None:
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.mlp_hidden)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    if arch == "gpt2":
        writer.add_layer_norm_eps(NORM_EPS)
        return
    writer.add_head_count_kv(config.n_head)
    writer.add_layer_norm_rms_eps(NORM_EPS)
    writer.add_rope_dimension_count(config.head_size)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_vocab_size(config.vocab_size)


def write_gguf(
    path: Path,
    weights: dict[str, torch.Tensor],
    config: ModelConfig,
    tokenizer: Tokenizer,
    dtype: str,
    name: str,
    chat: tuple[str, int] | None = None,
) -> str:
    """Write the model as GGUF to `path` (the caller makes it atomic); returns llama.cpp's arch name.
    `chat`: a chat run's Jinja template and the id that ends a reply."""
    gguf = _gguf()
    check_dtype(dtype)
    arch = hf.hf_architecture(config, engine="llama.cpp")
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(name)
    add_hyperparameters(writer, config, arch)
    add_tokenizer(writer, tokenizer, config.vocab_size)
    if chat is not None:
        writer.add_chat_template(chat[0])
        writer.add_eot_token_id(chat[1])
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}
    writer.add_file_type(file_types.get(dtype, gguf.LlamaFileType.MOSTLY_Q8_0))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for tensor_name, tensor in gguf_tensors(weights, config, arch).items():
        data, kind = _encode(gguf, tensor, dtype)
        writer.add_tensor(tensor_name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return arch
