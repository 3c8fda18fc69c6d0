"""Random batches of token windows from a prepared split, reproducible and resumable.

Every rank draws the same global batch of window starts from one seeded generator and keeps its own
slice, so ranks see different windows and N processes see exactly the windows that one process with
N times the gradient accumulation sees. The generator's state goes into checkpoints, so a resumed run
draws the batches it would have drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from smallgpt.data.nanogpt import is_nanogpt_folder, nanogpt_dataset
from smallgpt.data.prepare import load_meta
from smallgpt.data.tokenizers import Tokenizer, load_tokenizer
from smallgpt.errors import UserError

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # inputs, targets, loss mask


def open_dataset(data_dir: Path) -> tuple[dict[str, Any], Tokenizer]:
    """The description (meta.json) and tokenizer of a data folder: one `smallgpt prepare` wrote,
    or a nanoGPT one (train.bin / val.bin, maybe meta.pkl), read as it is."""
    if is_nanogpt_folder(data_dir):
        return nanogpt_dataset(data_dir)
    meta = load_meta(data_dir)
    tokenizer = load_tokenizer(data_dir / "tokenizer.json")
    if tokenizer.fingerprint() != meta["tokenizer"]["fingerprint"]:
        raise UserError(f"{data_dir}/tokenizer.json does not match its meta.json: prepare the data again")
    return meta, tokenizer


def open_split(data_dir: str | Path, split: str, dtype: str) -> np.ndarray:
    """Memory-map `<split>.bin`: the corpus is never read into RAM as a whole."""
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise UserError(f"{path} is missing: run `smallgpt prepare` to make {data_dir}")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty: prepare more text for the {split} split")
    return np.memmap(path, dtype=np.dtype(dtype), mode="r")


def open_mask(data_dir: str | Path, split: str, length: int) -> np.ndarray | None:
    """An optional `<split>.mask.bin` (uint8, 1 = count this target in the loss), aligned with the tokens."""
    path = Path(data_dir) / f"{split}.mask.bin"
    if not path.is_file():
        return None
    mask = np.memmap(path, dtype=np.uint8, mode="r")
    if len(mask) != length:
        raise UserError(f"{path} has {len(mask)} entries but {split}.bin has {length} tokens")
    return mask


class BatchSampler:
    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        batch_size: int,
        seed: int,
        device: torch.device,
        mask: np.ndarray | None = None,
        name: str = "data",
        rank: int = 0,
        world_size: int = 1,
    ):
        if len(tokens) < block_size + 1:
            raise UserError(
                f"{name} has {len(tokens):,} tokens, fewer than block_size + 1 = {block_size + 1}: "
                "use a smaller block_size or a longer corpus"
            )
        self.tokens, self.mask = tokens, mask
        self.block_size, self.batch_size = block_size, batch_size
        self.device = device
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = np.arange(block_size + 1)

    def next_batch(self) -> Batch:
        starts = torch.randint(
            len(self.tokens) - self.block_size, (self.batch_size * self.world_size,), generator=self.generator
        ).numpy()[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        index = starts[:, None] + self._offsets  # (B, T + 1)
        window = torch.from_numpy(self.tokens[index].astype(np.int64))
        x, y = window[:, :-1], window[:, 1:]
        m = torch.from_numpy(self.mask[index[:, 1:]].astype(np.bool_)) if self.mask is not None else None
        if self.device.type == "cuda":
            # pinned memory lets the copy overlap with compute; x and y are views into the window,
            # which the copy would first gather into pageable memory, and wait for
            return tuple(
                t.contiguous().pin_memory().to(self.device, non_blocking=True) if t is not None else None
                for t in (x, y, m)
            )  # type: ignore[return-value]
        return x.to(self.device), y.to(self.device), m.to(self.device) if m is not None else None

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
