"""The GPT language model, read top to bottom: norm -> rotary -> attention -> MLP -> block -> GPT.

Defaults reproduce nanoGPT's GPT-2 style model (learned positions, pre-LayerNorm, GELU MLP, tied
embedding/head). Config options switch on RMSNorm, a gated SiLU or a squared-ReLU MLP, rotary positions,
QK-norm and soft-capped logits.
The key/value cache has one slot per sequence, each slot its own length, so generation (decode.py)
pays one position of work per new token and decodes sequences of different lengths in one batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from smallgpt.errors import UserError


@dataclass
class ModelConfig:
    """The architecture (and dropout). Each field's docstring is its `smallgpt train --help` text."""

    block_size: int = 256
    """longest context the model sees, in tokens"""
    vocab_size: int = 0
    """token ids; 0: the prepared data's tokenizer's (larger pads it, e.g. 50304)"""
    n_layer: int = 6
    """transformer blocks"""
    n_head: int = 6
    """attention heads per block; must divide n_embd"""
    n_embd: int = 384
    """width of the residual stream"""
    dropout: float = 0.0
    """dropout rate in [0, 1) while training (a training setting: resume takes it from the command line)"""
    bias: bool = True
    """biases in Linear and LayerNorm layers, as GPT-2"""
    norm: str = "layernorm"
    """layernorm | rmsnorm"""
    mlp: str = "gelu"
    """gelu (GPT-2) | swiglu (gated SiLU, as Llama) | relu2 (squared ReLU, as modded-nanogpt)"""
    gelu_approx: str = "none"
    """none (exact GELU) | tanh (OpenAI GPT-2's approximation, for its weights)"""
    pos_emb: str = "learned"
    """learned (GPT-2) | rope (rotary)"""
    rope_theta: float = 10000.0
    """rope: base of the rotary frequencies"""
    qk_norm: bool = False
    """normalise queries and keys per head before attention"""
    logit_softcap: float = 0.0
    """0: off; c > 0: logits become c * tanh(logits / c), bounded in (-c, c) (Gemma 2, modded-nanogpt)"""

    def validate(self, vocab_known: bool = True) -> None:
        """The one place architecture values are checked. `vocab_known=False` (a training config)
        also accepts vocab_size 0: training takes it from the data's tokenizer."""
        sizes = ("block_size", "n_layer", "n_head", "n_embd", *(("vocab_size",) if vocab_known else ()))
        for name in sizes:
            if getattr(self, name) <= 0:
                raise UserError(f"model {name} must be positive, got {getattr(self, name)}")
        if self.vocab_size < 0:
            raise UserError(f"model vocab_size must not be negative, got {self.vocab_size}")
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
            raise UserError(f"rope needs an even head size, got {self.n_embd // self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        if not (math.isfinite(self.logit_softcap) and self.logit_softcap >= 0):
            raise UserError(f"logit_softcap must be 0 (off) or positive, got {self.logit_softcap}")
        options = (("norm", NORMS), ("mlp", MLPS), ("pos_emb", POS_EMBS), ("gelu_approx", GELU_APPROX))
        for name, allowed in options:
            if getattr(self, name) not in allowed:
                raise UserError(
                    f"model {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        # a gated MLP has three matrices; 8/3 * n_embd hidden keeps the parameter count of 4 * n_embd
        return 4 * self.n_embd if self.mlp != "swiglu" else 16 * math.ceil(8 * self.n_embd / 3 / 16)


NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu", "relu2")
POS_EMBS = ("learned", "rope")
GELU_APPROX = ("none", "tanh")
NORM_EPS = 1e-5  # of LayerNorm and RMSNorm, as GPT-2
TIED_HEAD = "lm_head.weight"  # the same tensor as transformer.wte.weight: checkpoints store it once


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or config.n_embd
    if config.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=NORM_EPS)
    return nn.LayerNorm(dim, eps=NORM_EPS, bias=config.bias)


def rotary_tables(head_size: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (length, head_size / 2) for rotary position embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2).float() / head_size))
    angles = torch.outer(torch.arange(length).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of each head vector; x is (B, nh, T, hs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class KVCache:
    """Keys and values of every layer, preallocated to block_size for a fixed number of slots.

    A slot holds one sequence and has its own length, so sequences of different lengths (requests
    that joined at different times) decode in one batch. A forward uses the slots chosen with
    `select`: input row i reads and writes slot rows[i], at that slot's next positions.
    """

    def __init__(self, config: ModelConfig, slots: int, device: torch.device, dtype: torch.dtype):
        shape = (slots, config.n_head, config.block_size, config.head_size)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.block_size = config.block_size
        self.lengths = [0] * slots  # positions filled per slot; on the host, so reading them never syncs
        self.select(range(slots))

    def select(self, rows: Iterable[int]) -> KVCache:
        """Make the next forward use these slots (input row i -> slot rows[i])."""
        rows = list(rows)
        if rows == getattr(self, "rows", None):
            return self  # decoding the same batch again: keep its index tensors
        self.rows = rows
        self.write_rows = torch.tensor(rows, device=self.keys[0].device)[:, None]  # (B, 1)
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        # a run of slots reads through a slice, a view; an index tensor would copy the cache each layer
        self.read_rows = slice(rows[0], rows[-1] + 1) if contiguous else self.write_rows[:, 0]
        return self

    def append(self, new: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Make room for `new` tokens in each selected slot, for the forward about to run.

        Returns their positions (B, new) and the attention mask (B, 1, new, end), True = attend,
        where end is the longest selected slot's new length: a token sees its own slot up to its
        position, never a shorter slot's unused or stale tail. The mask is None where attention
        needs none: slots equally long and either one new token each (it sees all) or nothing cached
        before (plain causal).
        """
        starts = [self.lengths[row] for row in self.rows]
        self.end = max(starts) + new
        if self.end > self.block_size:
            raise ValueError(f"sequence of length {self.end} exceeds block_size {self.block_size}")
        device = self.keys[0].device
        self.positions = torch.tensor([range(start, start + new) for start in starts], device=device)
        for row in self.rows:
            self.lengths[row] += new
        self.shared_start = starts[0] if len(set(starts)) == 1 else None
        if self.shared_start is not None and (new == 1 or self.shared_start == 0):
            return self.positions, None
        visible = torch.arange(self.end, device=device) <= self.positions[:, :, None]  # (B, new, end)
        return self.positions, visible[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values (B, nh, T_new, hs) at the positions `append` made room for (in
        the cache's dtype); return the selected slots' keys/values so far (B, nh, end, hs)."""
        rows, end = self.read_rows, self.end
        k, v = k.to(self.keys[layer].dtype), v.to(self.values[layer].dtype)
        if isinstance(rows, slice) and self.shared_start is not None:
            # a run of slots at one position (batch 1, or a batch that started together): a plain
            # copy into a view, cheaper than the scatter below
            self.keys[layer][rows, :, self.shared_start : end] = k
            self.values[layer][rows, :, self.shared_start : end] = v
        else:
            self.keys[layer][self.write_rows, :, self.positions] = k.transpose(1, 2)  # (B, T_new, nh, hs)
            self.values[layer][self.write_rows, :, self.positions] = v.transpose(1, 2)
        return self.keys[layer][rows, :, :end], self.values[layer][rows, :, :end]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
) -> torch.Tensor:
    """Scaled dot-product attention (B, nh, T, hs). On a CPU it runs in fp32 when its inputs are
    bf16 (a bf16 model, or training's bf16 autocast): torch's CPU attention kernels are several times
    slower in bf16, forward and backward, and attention's inputs are small next to the Linear
    layers', which gain from bf16 (docs/benchmarks.md)."""
    if torch.compiler.is_compiling() and q.device.type == "cpu" and q.size(2) == 1 and attn_mask is not None:
        return _one_query_attention(q, k, v, attn_mask)
    if q.device.type == "cpu" and (q.dtype != torch.float32 or torch.is_autocast_enabled("cpu")):
        with torch.autocast("cpu", enabled=False):
            y = attention(q.float(), k.float(), v.float(), attn_mask, dropout_p, is_causal)
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal
    )


def _one_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Attention of one new token per row (q (B, nh, 1, hs)) over its cache (k, v (B, nh, T, hs)),
    mask (B, 1, 1, T). Written as two reductions over the cache, which inductor fuses into loops of
    its own on a CPU: faster in a compiled decoding step than the attention kernel, which is built
    for many queries at once (docs/benchmarks.md, generation speed)."""
    scores = (q * k).sum(-1) / math.sqrt(q.size(-1))  # (B, nh, T)
    weights = scores.masked_fill(~mask[:, :, 0], float("-inf")).softmax(dim=-1)  # (B, nh, T)
    return (weights.unsqueeze(-1) * v).sum(dim=-2, keepdim=True).to(q.dtype)  # (B, nh, 1, hs)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.q_norm = make_norm(config, config.head_size) if config.qk_norm else None
        self.k_norm = make_norm(config, config.head_size) if config.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        kv_cache: KVCache | None,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)  # (B, nh, end, hs)
        y = attention(
            q,
            k,
            v,
            attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            # no mask: causal when all keys are new, else (one new token per row) it sees them all
            is_causal=attn_mask is None and T > 1 and k.size(2) == T,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gated = config.mlp == "swiglu"
        self.relu2 = config.mlp == "relu2"
        self.gelu_approx = config.gelu_approx
        hidden = config.mlp_hidden
        self.c_fc = nn.Linear(config.n_embd, hidden * (2 if self.gated else 1), bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.relu2:
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate=self.gelu_approx)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rotary, kv_cache, attn_mask):
        x = x + self.attn(self.ln_1(x), rotary, kv_cache, attn_mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd) if config.pos_emb == "learned" else None,
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=make_norm(config),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as GPT-2
        if config.pos_emb == "rope":
            cos, sin = rotary_tables(config.head_size, config.block_size, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer): two per block add to x
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def activations(self) -> tuple[torch.device, torch.dtype]:
        """Where the model computes, and in which dtype: its token embedding's (a head quantized to
        int8 has weights of its own dtype)."""
        weight = cast(nn.Embedding, self.transformer.wte).weight
        return weight.device, weight.dtype

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; position embeddings are left out by default, as in nanoGPT."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.transformer.wpe is not None:
            n -= self.transformer.wpe.weight.numel()
        return n

    def set_dropout(self, p: float) -> None:
        """Change the dropout rate of a built model: fine-tuning often wants more than pre-training."""
        replace(self.config, dropout=p).validate()  # a bad rate raises before anything changes
        self.config.dropout = p
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = p
            elif isinstance(module, CausalSelfAttention):
                module.dropout = p  # the attention kernel's dropout_p

    def hidden_states(
        self,
        idx: torch.Tensor,
        kv_cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, n_embd) for token ids idx (B, T).

        With a cache, idx holds only the new positions of the slots the cache has selected (the
        cache makes the mask); attn_mask (bool, True = attend) is for callers without a cache, such
        as the classifier, that pad batches.
        """
        T = idx.size(1)
        if kv_cache is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of length {T} exceeds block_size {self.config.block_size}")
            positions = torch.arange(T, device=idx.device)  # (T,), the same for every row
        else:
            positions, attn_mask = kv_cache.append(T)  # (B, T): each row continues its own slot
        x = self.transformer.wte(idx)  # (B, T, C)
        rotary = None
        if self.transformer.wpe is not None:
            x = x + self.transformer.wpe(positions)
        else:
            # (T, hs/2) or (B, T, hs/2) -> one more axis to broadcast over the heads
            rotary = (self.rope_cos[positions].unsqueeze(-3), self.rope_sin[positions].unsqueeze(-3))
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rotary, kv_cache, attn_mask)
        return self.transformer.ln_f(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head over final hidden states (..., n_embd) -> (..., vocab), soft-capped if configured."""
        logits = self.lm_head(hidden)
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        loss_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits, and the mean cross-entropy when targets are given.

        Without targets only the last position's logits are computed (all that sampling needs).
        loss_mask (B, T), when given, restricts the loss to positions where it is 1 (chat bot turns).
        """
        x = self.hidden_states(idx, kv_cache)
        if targets is None:
            return self.logits(x[:, [-1], :]), None  # (B, 1, vocab)
        logits = self.logits(x)  # (B, T, vocab)
        if loss_mask is None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        else:
            per_token = F.cross_entropy(
                logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction="none"
            )
            weights = loss_mask.reshape(-1).to(per_token.dtype)
            loss = (per_token * weights).sum() / weights.sum().clamp(min=1.0)
        return logits, loss

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 L T C."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.block_size * c.n_embd
