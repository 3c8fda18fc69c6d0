from pathlib import Path

import pytest
import torch

# Test models are tiny: on a busy shared machine extra intra-op threads only spin-wait on each
# other (40 steps of a 2-layer model: 30 s with 2 threads, 1 s with 1).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real corpora shared next to the repo (../shared/data); never copied into it."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data"
    assert path.is_dir(), f"shared test data folder {path} is missing"
    return path
