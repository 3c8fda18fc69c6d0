"""Fixtures shared by the test files: the shared corpora, the tiny shakespeare char dataset, and
run folders holding a random tiny GPT."""

import hashlib
import os
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


TINY_TRAINING = [
    "--n_layer=2",
    "--n_head=2",
    "--n_embd=32",
    "--batch_size=4",
    "--eval_iters=2",
    "--learning_rate=3e-3",
    "--warmup_iters=0",
    "--progress=false",
    "--device=cpu",
]


def train_char_run(run: Path, char_data: Path, block_size: int, max_iters: int) -> Path:
    """A tiny char model trained on tiny shakespeare through the CLI, evaluated twice."""
    from smallgpt.cli import main

    args = [f"--dataset={char_data}", f"--out_dir={run}", f"--block_size={block_size}"]
    iters = [f"--max_iters={max_iters}", f"--eval_interval={max_iters // 2}"]
    assert main(["train", *args, *iters, *TINY_TRAINING]) == 0
    return run


@pytest.fixture(scope="session")
def lm_run(tmp_path_factory, char_data) -> Path:
    """A tiny char model trained for a few iterations on tiny shakespeare, through the CLI."""
    return train_char_run(tmp_path_factory.mktemp("runs") / "shakespeare", char_data, 256, 40)


@pytest.fixture(scope="session")
def lccc_chat_run(tmp_path_factory, shared_data) -> Path:
    """A tiny char model trained for a few iterations on LCCC dialogues in the chat format."""
    from smallgpt.cli import main

    root = tmp_path_factory.mktemp("chat_runs")
    dialogues = shared_data / "chitchat_lccc" / "toy_valid.txt"
    assert (
        main(
            [
                "prepare",
                "--input",
                str(dialogues),
                "--format",
                "chat",
                "--block-size",
                "64",
                "--out",
                str(root / "data"),
            ]
        )
        == 0
    )
    run = root / "lccc"
    args = [f"--dataset={root / 'data'}", f"--out_dir={run}", "--block_size=64", "--max_iters=60"]
    faster = ["--batch_size=8", "--learning_rate=1e-2"]  # enough for greedy replies that are not empty
    assert main(["train", *args, "--eval_interval=30", "--loss_on=bot", *TINY_TRAINING, *faster]) == 0
    return run


class ServerProcess:
    """`smallgpt serve` in a child process on a free port of 127.0.0.1; stopped by `close()`."""

    def __init__(self, log: Path, *args: str, cwd: Path | None = None):
        import socket
        import subprocess
        import sys

        with socket.socket() as s:  # a free port (the race with other processes is harmless here)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        self.log = log
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
        command = [sys.executable, "-m", "smallgpt", "serve", "--port", str(port), "--device", "cpu", *args]
        with open(log, "w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        self.wait_until_up()

    def wait_until_up(self, timeout: float = 120) -> None:
        import time
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"smallgpt serve exited:\n{self.log.read_text()}"
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.2)
        self.close()
        raise AssertionError(f"smallgpt serve did not answer in {timeout} s:\n{self.log.read_text()}")

    def output(self) -> str:
        return self.log.read_text()

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture(scope="session")
def server(tmp_path_factory, lm_run, lccc_chat_run):
    """One server for the serve tests: the shakespeare run and the LCCC chat run, batches of 8."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    process = ServerProcess(log, "--run", str(lm_run), "--run", str(lccc_chat_run), "--max-batch", "8")
    yield process
    process.close()
    assert "Traceback" not in process.output(), process.output()  # no request ever hit a bug


@pytest.fixture(scope="session")
def system_chat_run(tmp_path_factory) -> Path:
    """A chat run whose tokenizer has <|system|> (as prepare gives data with system messages), with
    random weights: for tests of what reaches the model's context, not of what it answers."""
    from smallgpt.chat.format import CHAT_TOKENS, SYSTEM_TOKEN
    from smallgpt.data.tokenizers import CharTokenizer

    tokenizer = CharTokenizer("你好呀吃了吗过再见拜猫狗是")
    tokenizer.add_special_tokens((*CHAT_TOKENS, SYSTEM_TOKEN))
    run = tmp_path_factory.mktemp("system_chat") / "system_chat"
    config = ModelConfig(block_size=48, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=16)
    write_run(run, config, tokenizer)
    return run


@pytest.fixture
def generation_prompts(monkeypatch) -> list[list[int]]:
    """The prompt ids of every generation (any front-end in this process), in order."""
    from smallgpt.decode import DecodeEngine

    prompts: list[list[int]] = []
    generate = DecodeEngine.generate

    def recording(self, prompt_ids, *args, **kwargs):
        prompts.append(list(prompt_ids))
        return generate(self, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(DecodeEngine, "generate", recording)
    return prompts


@pytest.fixture(scope="session")
def base_run(tmp_path_factory, char_data) -> Path:
    """A tiny char model trained on tiny shakespeare, the base that fine-tuning tests start from."""
    return train_char_run(tmp_path_factory.mktemp("base") / "base", char_data, 32, 20)


@pytest.fixture
def nan_losses(monkeypatch):
    """Make the training loss NaN at the given forward calls (counted over training-mode calls)."""
    forward, calls, bad = GPT.forward, [0], set()

    def nan_at(self, *args, **kwargs):
        logits, loss = forward(self, *args, **kwargs)
        if self.training and loss is not None:
            calls[0] += 1
            if calls[0] in bad:
                loss = loss + float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", nan_at)
    return bad
