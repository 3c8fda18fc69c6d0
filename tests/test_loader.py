from types import SimpleNamespace

import numpy as np
import torch

from smallgpt.data.loader import BatchSampler


def test_batches_for_a_gpu_are_pinned_as_contiguous_tensors(monkeypatch):
    """A non-blocking copy to the GPU is asynchronous only from one pinned block; a strided view
    (inputs and targets are two of one window) would be copied through pageable memory first."""
    pinned = []

    def pin_memory(tensor):  # no GPU here: record what would be pinned, and copy nothing
        pinned.append(tensor.is_contiguous())
        return SimpleNamespace(to=lambda device, non_blocking: tensor)

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    tokens = np.arange(100, dtype=np.uint16)
    x, y, mask = BatchSampler(tokens, 8, 4, 0, torch.device("cuda"), mask=tokens % 2 == 0).next_batch()
    assert pinned == [True, True, True]
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(mask, y % 2 == 0)
    cpu = BatchSampler(tokens, 8, 4, 0, torch.device("cpu"), mask=tokens % 2 == 0).next_batch()
    assert all(torch.equal(a, b) for a, b in zip(cpu, (x, y, mask)))  # the same batch as on a CPU
