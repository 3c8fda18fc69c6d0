"""The cache slots all at once: a view of a `KVCache` in which every slot decodes one token a step,
for a compiled decoding step (decode.py), whose shapes must not change from one step to the next."""

from __future__ import annotations

import torch

from smallgpt.model.gpt import KVCache


class AllSlots(KVCache):
    """Every slot of a KV cache at once, one new token each, slot i's at positions[i]; attention
    spans the whole block, masked past each slot's position. Shapes never change from one step to
    the next, which is what a compiled decode step (torch.compile) needs. Slots without a request
    just compute a token nobody reads; the caller advances `lengths` of the slots that decode.
    """

    def __init__(self, cache: KVCache, positions: torch.Tensor):  # shares the cache's tensors
        self.keys, self.values, self.block_size = cache.keys, cache.values, cache.block_size
        self.positions = positions  # (S,)
        self.slots = torch.arange(len(positions), device=positions.device)

    def append(self, new: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        visible = torch.arange(self.block_size, device=self.positions.device) <= self.positions[:, None]
        return self.positions[:, None], visible[:, None, None, :]  # (S, 1), (S, 1, 1, block)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.keys[layer].dtype
        self.keys[layer][self.slots, :, self.positions] = k[:, :, 0].to(dtype)  # (S, nh, hs) at each position
        self.values[layer][self.slots, :, self.positions] = v[:, :, 0].to(dtype)
        return self.keys[layer], self.values[layer]  # (S, nh, block, hs)
