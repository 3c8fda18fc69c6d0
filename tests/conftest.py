"""Fixtures shared by the test files: the shared corpora, the tiny shakespeare char dataset, and
run folders holding a random tiny GPT."""

import hashlib
from pathlib import Path

import pytest
import torch

from smallgpt.data.tokenizers import Tokenizer, save_tokenizer
from smallgpt.model.gpt import GPT, ModelConfig
from smallgpt.preparation import PrepareArgs, run_prepare
from smallgpt.train import checkpoint

# Test models are tiny: on a busy shared machine extra intra-op threads only spin-wait on each
# other (40 steps of a 2-layer model: 30 s with 2 threads, 1 s with 1).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real corpora shared next to the repo (../shared/data); never copied into it."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data"
    assert path.is_dir(), f"shared test data folder {path} is missing"
    return path


@pytest.fixture(scope="session")
def char_data(tmp_path_factory, shared_data) -> Path:
    """tiny shakespeare prepared with the char tokenizer, once for the whole session (read-only)."""
    out = tmp_path_factory.mktemp("data") / "shakespeare_char"
    run_prepare(PrepareArgs(input=str(shared_data / "tinyshakespeare" / "input.txt"), out=str(out)))
    return out


def write_run(run_dir: Path, config: ModelConfig, tokenizer: Tokenizer, seed: int = 0) -> GPT:
    """A run folder as `smallgpt train` leaves it (ckpt/best, tokenizer.json), with a random GPT."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    tags = {"tokenizer_fingerprint": tokenizer.fingerprint()}
    checkpoint.write_checkpoint(run_dir / "ckpt" / "best", checkpoint.model_weights(model), config, {}, tags)
    save_tokenizer(tokenizer, run_dir / "tokenizer.json")
    return model


@pytest.fixture(scope="session")
def make_run():
    """`write_run`, for tests and fixtures that need a trained-looking run without training."""
    return write_run


def hash_files(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path: equal dicts mean nothing was written."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def folder_hashes():
    return hash_files
