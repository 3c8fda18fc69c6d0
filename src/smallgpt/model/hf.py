"""Hugging Face interop: GPT-2 weights into smallgpt (`init_from=gpt2`), smallgpt runs out to `transformers`.

Two transformers architectures are smallgpt's GPT with other tensor names:
  GPT-2 (GPT2LMHeadModel): learned positions, LayerNorm, GELU. Its Conv1D layers store weights as
      (in, out), the transpose of nn.Linear, so c_attn, c_proj and c_fc are transposed both ways.
  Llama (LlamaForCausalLM): rotary positions, RMSNorm, SwiGLU. q/k/v and gate/up are separate
      matrices there and packed ones here (c_attn, c_fc), so they are split or concatenated.
Both directions read and write config.json and model.safetensors directly (`smallgpt export`, in
export.py, writes runs out with this module): nothing here imports `transformers`, and only
downloading from the hub (model/hub.py) needs `huggingface_hub`.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from smallgpt.data.tokenizers import EOT, GPT2Tokenizer, Tokenizer, gpt2_files, load_tokenizer, save_tokenizer
from smallgpt.errors import UserError
from smallgpt.io import atomic_write_json, atomic_write_text
from smallgpt.model.gpt import GPT, NORM_EPS, TIED_HEAD, ModelConfig
from smallgpt.model.hub import HF_WEIGHTS, HUB_MODELS, download

SMALLGPT_TOKENIZER = "smallgpt_tokenizer.json"  # our tokenizer, so `--init-from <exported folder>` works
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
EXPORT_NEEDS = {  # the options each architecture has; the rest of ModelConfig maps to both
    "gpt2": {"norm": "layernorm", "mlp": "gelu", "qk_norm": False, "logit_softcap": 0.0},
    "llama": {"norm": "rmsnorm", "mlp": "swiglu", "qk_norm": False, "logit_softcap": 0.0},
}
CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")
UNUSED = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")  # causal masks, rotary tables
LLAMA_NAMES = {  # smallgpt module -> Llama module(s); packed matrices split along the output dim
    "wte": ["embed_tokens"],
    "ln_f": ["norm"],
    "ln_1": ["input_layernorm"],
    "ln_2": ["post_attention_layernorm"],
    "attn.c_attn": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "attn.c_proj": ["self_attn.o_proj"],
    "mlp.c_fc": ["mlp.gate_proj", "mlp.up_proj"],
    "mlp.c_proj": ["mlp.down_proj"],
}


def hf_names(arch: str, key: str) -> tuple[list[str], bool]:
    """The Hugging Face tensor name(s) of smallgpt weight `key`, and whether they are transposed."""
    if arch == "gpt2":
        return [key], key.endswith(CONV1D)
    match = re.fullmatch(r"transformer\.(?:h\.(\d+)\.)?(.+)\.(weight|bias)", key)
    if match is None:
        raise ValueError(f"{key} is not a smallgpt weight name")
    layer, module, kind = match.groups()
    prefix = "model." if layer is None else f"model.layers.{layer}."
    return [f"{prefix}{name}.{kind}" for name in LLAMA_NAMES[module]], False


# ---- Hugging Face -> smallgpt ----------------------------------------------------------------------


def _require(path: Path, hf: dict[str, Any], rules: dict[str, tuple[Any, tuple]]) -> None:
    """UserError naming the first config.json key whose value (or default) smallgpt cannot match."""
    for key, (default, allowed) in rules.items():
        value = hf.get(key, default)
        if value not in allowed:
            supported = " or ".join(repr(a) for a in allowed)
            raise UserError(f"{path}: {key}={value!r} has no smallgpt equivalent (supported: {supported})")


def _gpt2_config(hf: dict[str, Any], path: Path) -> ModelConfig:
    _require(
        path,
        hf,
        {  # key: (GPT2Config's default, the values smallgpt computes the same way)
            "n_inner": (None, (None, 4 * hf["n_embd"])),
            "activation_function": ("gelu_new", ("gelu_new", "gelu_pytorch_tanh", "gelu")),
            "layer_norm_epsilon": (1e-5, (NORM_EPS,)),
            "scale_attn_weights": (True, (True,)),
            "scale_attn_by_inverse_layer_idx": (False, (False,)),
            "tie_word_embeddings": (True, (True,)),
        },
    )
    return ModelConfig(
        block_size=hf["n_positions"],
        vocab_size=hf["vocab_size"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        gelu_approx="none" if hf.get("activation_function") == "gelu" else "tanh",
    )


def _llama_config(hf: dict[str, Any], path: Path) -> ModelConfig:
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    # transformers 5 writes rope_parameters, 4 wrote rope_theta and rope_scaling
    rope = hf.get("rope_parameters") or {"rope_theta": hf.get("rope_theta", 10000.0)}
    config = ModelConfig(
        block_size=hf["max_position_embeddings"],
        vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_embd=n_embd,
        bias=hf.get("attention_bias", False),
        norm="rmsnorm",
        mlp="swiglu",
        pos_emb="rope",
        rope_theta=float(rope["rope_theta"]),
    )
    _require(
        path,
        {**hf, "rope_type": rope.get("rope_type", "default")},
        {  # key: (LlamaConfig's default, the values smallgpt computes the same way)
            "num_key_value_heads": (n_head, (n_head,)),
            "head_dim": (config.head_size, (config.head_size,)),
            "intermediate_size": (None, (config.mlp_hidden,)),
            "hidden_act": ("silu", ("silu",)),
            "rms_norm_eps": (1e-6, (NORM_EPS,)),
            "rope_scaling": (None, (None,)),
            "rope_type": ("default", ("default",)),
            "mlp_bias": (False, (config.bias,)),
            "tie_word_embeddings": (False, (True,)),
        },
    )
    return config


def read_hf_config(folder: Path) -> tuple[str, ModelConfig]:
    """The architecture ("gpt2" or "llama") and smallgpt model config of a Hugging Face folder."""
    path = folder / "config.json"
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{folder} is not a Hugging Face model folder: it has no config.json") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable: {e}") from None
    readers = {"gpt2": _gpt2_config, "llama": _llama_config}
    arch = hf.get("model_type")
    if arch not in readers:
        raise UserError(f"{path}: model_type {arch!r} cannot be loaded into smallgpt (gpt2 and llama can)")
    try:
        return arch, readers[arch](hf, path)
    except KeyError as e:
        raise UserError(f"{path} has no {e.args[0]!r}") from None


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or an older pytorch_model.bin loaded without unpickling objects."""
    path = folder / HF_WEIGHTS
    try:
        if path.is_file():
            return load_file(str(path))
        if (folder / "pytorch_model.bin").is_file():
            return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise UserError(f"weights in {folder} are truncated or corrupted ({e})") from None
    raise UserError(f"{folder} has no {HF_WEIGHTS} (a sharded checkpoint is not supported)")


def load_hf_weights(model: GPT, weights: dict[str, torch.Tensor], arch: str, where: Path) -> None:
    """Rename, transpose, concatenate (and crop wpe to block_size) `weights` into `model`."""
    if arch == "gpt2":  # the hub's GPT-2 files hold GPT2Model's names, without "transformer."
        full = ("transformer.", "lm_head.")
        weights = {k if k.startswith(full) else f"transformer.{k}": v for k, v in weights.items()}
    state = {}
    for key, ours in model.state_dict().items():
        if key == TIED_HEAD:
            continue
        names, transpose = hf_names(arch, key)
        missing = [name for name in names if name not in weights]
        if missing:
            raise UserError(f"{where} has no tensor {missing[0]}")
        parts = [weights.pop(name) for name in names]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)  # no copy of gpt2-xl's 6 GB
        tensor = tensor.t() if transpose else tensor
        if key == "transformer.wpe.weight":
            tensor = tensor[: ours.size(0)]  # block_size cropping: the first positions only
        if tensor.shape != ours.shape:
            shapes = f"{tuple(tensor.shape)}, expected {tuple(ours.shape)}"
            raise UserError(f"{where}: {names[0]} has shape {shapes}")
        state[key] = tensor.float()
    head = weights.pop(TIED_HEAD, None)
    if head is not None and not torch.equal(head.float(), state["transformer.wte.weight"]):
        raise UserError(f"{where}: lm_head is not tied to the token embedding, as smallgpt's always is")
    extra = [k for k in weights if not k.endswith(UNUSED)]
    if extra:
        raise UserError(f"{where} has tensors smallgpt has no place for: {', '.join(extra[:3])}")
    model.load_state_dict(state, strict=False)  # lm_head.weight is wte's tensor


@dataclass
class Pretrained:
    """A Hugging Face model folder, its smallgpt config and the tokenizer its token ids belong to."""

    source: str  # what the user named: a hub model (gpt2, ...) or a folder
    folder: Path
    arch: str
    config: ModelConfig
    tokenizer: Tokenizer = field(repr=False)

    def model(self, block_size: int | None = None, dropout: float = 0.0) -> GPT:
        """A GPT with these weights; a shorter block_size crops the position embeddings."""
        if block_size is not None and block_size > self.config.block_size:
            raise UserError(f"block_size {block_size} exceeds {self.source}'s {self.config.block_size}")
        config = replace(self.config, block_size=block_size or self.config.block_size, dropout=dropout)
        model = GPT(config)
        load_hf_weights(model, read_hf_weights(self.folder), self.arch, self.folder)
        return model


def open_pretrained(source: str) -> Pretrained:
    """gpt2 ... gpt2-xl (downloaded once, then cached) or a local Hugging Face folder.

    Its tokenizer is the smallgpt_tokenizer.json that `smallgpt export` writes, else GPT-2's.
    """
    folder = download(HUB_MODELS[source]) if source in HUB_MODELS else Path(source)
    if not folder.is_dir():
        raise UserError(f"init_from {source!r} is neither {', '.join(HUB_MODELS)} nor a folder")
    arch, config = read_hf_config(folder)
    if (folder / SMALLGPT_TOKENIZER).is_file():
        tokenizer = load_tokenizer(folder / SMALLGPT_TOKENIZER)
    else:
        tokenizer = GPT2Tokenizer()
    if config.vocab_size < tokenizer.vocab_size:
        raise UserError(
            f"{folder} has fewer token ids ({config.vocab_size}) than its {tokenizer.kind} tokenizer"
        )
    return Pretrained(source, folder, arch, config, tokenizer)


# ---- smallgpt -> Hugging Face ----------------------------------------------------------------------


def hf_architecture(config: ModelConfig, engine: str = "transformers") -> str:
    """gpt2 or llama, whichever has these options; UserError naming the option neither has (in
    transformers or in llama.cpp: their gpt2 and llama architectures have the same options)."""
    arch = "gpt2" if config.pos_emb == "learned" else "llama"
    for key, value in EXPORT_NEEDS[arch].items():
        if getattr(config, key) != value:
            target = (
                f"transformers' {ARCHITECTURES[arch]}" if engine == "transformers" else f"{engine}'s {arch}"
            )
            raise UserError(
                f"cannot export {key}={getattr(config, key)!r} with pos_emb={config.pos_emb}: "
                f"{target} needs {key}={value!r}"
            )
    return arch


def hf_config(config: ModelConfig, arch: str, eot_id: int) -> dict[str, Any]:
    common = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
    }
    if arch == "gpt2":
        return {
            **common,
            "n_positions": config.block_size,
            "n_embd": config.n_embd,
            "n_layer": config.n_layer,
            "n_head": config.n_head,
            "n_inner": config.mlp_hidden,
            "activation_function": "gelu_new" if config.gelu_approx == "tanh" else "gelu",
            "layer_norm_epsilon": NORM_EPS,
            "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout,
            "attn_pdrop": config.dropout,
        }
    return {
        **common,
        "hidden_size": config.n_embd,
        "intermediate_size": config.mlp_hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_head,
        "head_dim": config.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": NORM_EPS,
        "rope_theta": config.rope_theta,  # transformers 4 reads this, 5 reads rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_bias": config.bias,
        "mlp_bias": config.bias,
        "attention_dropout": config.dropout,
    }


def with_zero_biases(
    weights: dict[str, torch.Tensor], config: ModelConfig, arch: str
) -> dict[str, torch.Tensor]:
    """The weights, plus zero biases where GPT-2 (which always has biases) needs them: the same as none."""
    weights = dict(weights)
    if arch == "gpt2" and not config.bias:
        for key, tensor in list(weights.items()):
            if not key.endswith(("wte.weight", "wpe.weight")):
                weights[key.removesuffix(".weight") + ".bias"] = torch.zeros(tensor.size(0))
    return weights


def hf_weights(weights: dict[str, torch.Tensor], config: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """A checkpoint's weights (the tied head stored once) under the architecture's names and layout."""
    out = {}
    for key, tensor in with_zero_biases(weights, config, arch).items():
        names, transpose = hf_names(arch, key)
        for name, part in zip(names, tensor.chunk(len(names), dim=0)):
            out[name] = (part.t() if transpose else part).contiguous()
    return out


def write_tokenizer(tokenizer: Tokenizer, block_size: int, folder: Path) -> str:
    """Tokenizer files AutoTokenizer loads, where one exists; returns a note for the user otherwise."""
    save_tokenizer(tokenizer, folder / SMALLGPT_TOKENIZER)
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT, "model_max_length": block_size}
    if tokenizer.kind == "gpt2":
        shutil.copyfile(gpt2_files() / "encoder.json", folder / "vocab.json")
        shutil.copyfile(gpt2_files() / "vocab.bpe", folder / "merges.txt")
        atomic_write_json(folder / "tokenizer_config.json", {"tokenizer_class": "GPT2Tokenizer", **special})
        return ""
    hf_json = tokenizer.hf_tokenizer_json()
    if hf_json is None:
        return (
            f"; transformers has no {tokenizer.kind} tokenizer, so only smallgpt reads this one "
            f"({SMALLGPT_TOKENIZER})"
        )
    atomic_write_text(folder / "tokenizer.json", hf_json)
    fast = {"tokenizer_class": "PreTrainedTokenizerFast", **special}
    atomic_write_json(folder / "tokenizer_config.json", fast)
    return ""
