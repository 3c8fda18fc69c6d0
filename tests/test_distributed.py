"""Distributed training on CPU with gloo: 2 processes under torchrun against 1 process, in-process checks."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from smallgpt.cli import pop_nproc
from smallgpt.config import load_config
from smallgpt.data.loader import BatchSampler
from smallgpt.errors import UserError
from smallgpt.train import checkpoint
from smallgpt.train.distributed import torchrun_command
from smallgpt.train.run import train

SRC = Path(__file__).resolve().parents[1] / "src"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# 6 iterations of a 2-layer model; ckpt/last at 3 and 6; each process does one of two micro-steps
ARGS = [
    "--block_size=32",
    "--n_layer=2",
    "--n_head=2",
    "--n_embd=32",
    "--batch_size=4",
    "--gradient_accumulation_steps=2",
    "--eval_iters=4",
    "--eval_interval=3",
    "--log_interval=1",
    "--learning_rate=3e-3",
    "--warmup_iters=2",
    "--lr_decay_iters=6",
    "--progress=false",
    "--device=cpu",
]


def launch(command: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def train_two(data: Path, out_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [*TORCHRUN, "-m", "smallgpt", "train", f"--dataset={data}", f"--out_dir={out_dir}"]
    result = launch([*command, *ARGS, *extra])
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def train_one(data: Path, out_dir: Path, *extra: str) -> None:
    train(load_config(None, [f"--dataset={data}", f"--out_dir={out_dir}", *ARGS, *extra]))


def events(run_dir: Path, kind: str) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["event"] == kind]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in events(run_dir, "train")]


def assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    a, b = checkpoint.load_model(a_dir), checkpoint.load_model(b_dir)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, msg=name)


@pytest.fixture(scope="module")
def one_process(char_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one") / "run"
    train_one(char_data, run_dir, "--max_iters=6")
    return run_dir


@pytest.fixture(scope="module")
def two_processes(char_data, tmp_path_factory):
    """6 iterations on 2 processes, started by `smallgpt train --nproc 2`."""
    run_dir = tmp_path_factory.mktemp("two") / "run"
    command = [sys.executable, "-m", "smallgpt", "train", "--nproc", "2", f"--dataset={char_data}"]
    result = launch([*command, f"--out_dir={run_dir}", *ARGS, "--max_iters=6"])
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def test_two_processes_follow_one_process_with_double_accumulation(one_process, two_processes):
    run_dir, _ = two_processes
    single = losses(one_process)
    assert len(single) == 6 and single[-1] < single[0]
    assert losses(run_dir) == pytest.approx(single, abs=1e-5)
    for key in ("train_loss", "val_loss"):  # ranks split the evaluation batches: same windows in all
        evals = [e[key] for e in events(run_dir, "eval")]
        assert evals == pytest.approx([e[key] for e in events(one_process, "eval")], abs=1e-5)
    assert_same_weights(one_process / "ckpt" / "last", run_dir / "ckpt" / "last")


def test_only_rank_zero_writes_and_logs(two_processes):
    run_dir, result = two_processes
    assert [e["iter"] for e in events(run_dir, "train")] == list(range(6))  # no line twice
    assert [e["iter"] for e in events(run_dir, "eval")] == [0, 3, 6]
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".lock",  # rank 0's run-folder lock
        "ckpt",
        "config.yaml",
        "data_meta.json",
        "metrics.jsonl",
        "tokenizer.json",
    ]
    assert sorted(p.name for p in (run_dir / "ckpt").iterdir()) == ["best", "last"]  # no temp leftovers
    assert result.stdout.count("step 6:") == 1 and result.stdout.count("number of parameters") == 1
    assert "Traceback" not in result.stderr and "destroy_process_group" not in result.stderr  # clean exit
    state = checkpoint.load_state(run_dir / "ckpt" / "last")
    assert len(state["rng"]) == 2 and state["iter_num"] == 6


def test_resume_under_two_processes_continues_exactly(char_data, two_processes, tmp_path):
    run_dir, _ = two_processes
    train_two(char_data, tmp_path / "split", "--max_iters=3")
    train_two(char_data, tmp_path / "split", "--max_iters=6", "--init_from=resume")
    assert losses(tmp_path / "split") == pytest.approx(losses(run_dir), abs=1e-6)
    assert_same_weights(run_dir / "ckpt" / "last", tmp_path / "split" / "ckpt" / "last")


def test_resume_with_another_process_count_is_user_error(char_data, two_processes):
    run_dir, _ = two_processes
    with pytest.raises(UserError, match="written by 2 processes"):
        train_one(char_data, run_dir, "--max_iters=8", "--init_from=resume")


def test_fsdp_matches_one_process_resumes_and_loads_into_one_process(char_data, one_process, tmp_path):
    # FSDP2 fully_shard runs on CPU with gloo in torch 2.13; checkpoints hold gathered full tensors
    run_dir = tmp_path / "fsdp"
    train_two(char_data, run_dir, "--parallel=fsdp", "--max_iters=3")
    train_two(char_data, run_dir, "--parallel=fsdp", "--max_iters=6", "--init_from=resume")
    assert losses(run_dir) == pytest.approx(losses(one_process), abs=1e-5)
    assert_same_weights(one_process / "ckpt" / "last", run_dir / "ckpt" / "last")
    # the optimizer state is gathered too: a full moment for every parameter, keyed by name
    state = checkpoint.load_state(run_dir / "ckpt" / "last")["optimizer"]["state"]
    assert state["transformer.h.0.mlp.c_fc.weight"]["exp_avg"].shape == (128, 32)


FAILING_RANK = """
import sys
from smallgpt.cli import main
from smallgpt.train.trainer import Trainer

train_step = Trainer.train_step

def failing_step(self):
    if self.dist.rank == 1 and self.iter_num == 2:
        raise RuntimeError("rank 1 broke on purpose")
    return train_step(self)

Trainer.train_step = failing_step
sys.exit(main(["train", *sys.argv[1:]]))
"""


def test_a_failing_rank_brings_the_job_down(char_data, tmp_path):
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    start = time.monotonic()
    command = [*TORCHRUN, str(script), f"--dataset={char_data}", f"--out_dir={tmp_path / 'run'}", *ARGS]
    result = launch([*command, "--max_iters=50"], timeout=60)  # a hang fails here instead of forever
    assert result.returncode != 0
    assert "rank 1 broke on purpose" in result.stderr
    assert time.monotonic() - start < 60


NAN_ON_RANK_1 = """
import sys
import torch.distributed as dist
from smallgpt.cli import main
from smallgpt.model.gpt import GPT

forward, calls = GPT.forward, [0]

def forward_nan_loss_on_rank_1(self, *args, **kwargs):
    # the 3rd training micro-step on rank 1 reports a NaN loss; its gradients stay finite, so the
    # all-reduced gradients look fine on rank 0: only the shared flag can stop both ranks together
    logits, loss = forward(self, *args, **kwargs)
    if self.training and loss is not None:
        calls[0] += 1
        if dist.get_rank() == 1 and calls[0] == 3:
            loss = loss.detach() * float("nan") + (loss - loss.detach())
    return logits, loss

GPT.forward = forward_nan_loss_on_rank_1
sys.exit(main(["train", *sys.argv[1:]]))
"""


def test_a_nan_on_one_rank_stops_every_rank_at_the_same_step(char_data, tmp_path):
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1)
    command = [*TORCHRUN, str(script), f"--dataset={char_data}", f"--out_dir={tmp_path / 'run'}", *ARGS]
    # each rank does one micro-step per iteration: rank 1's 3rd is iteration 2's
    result = launch([*command, "--max_iters=50"], timeout=60)
    assert result.returncode != 0
    assert result.stderr.count("error: training diverged at iteration 2: the loss") == 2, result.stderr[
        -3000:
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def torchrun_env(monkeypatch):
    """The environment torchrun gives a single-process world."""
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_process_group_is_destroyed_after_training_and_after_an_error(
    char_data, tmp_path, torchrun_env, parallel
):
    train_one(char_data, tmp_path / "run", "--max_iters=1", f"--parallel={parallel}")
    assert not dist.is_initialized()
    assert checkpoint.load_state(tmp_path / "run" / "ckpt" / "last")["iter_num"] == 1
    with pytest.raises(UserError, match="not found"):  # raised after the process group started
        train_one(tmp_path / "no_data", tmp_path / "run2", "--max_iters=1")
    assert not dist.is_initialized()


def test_ranks_draw_disjoint_slices_of_one_global_batch():
    tokens = np.arange(10_000, dtype=np.uint16)
    device = torch.device("cpu")
    one = BatchSampler(tokens, 8, 8, seed=3, device=device)
    ranks = [BatchSampler(tokens, 8, 4, seed=3, device=device, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(3):
        x_one = one.next_batch()[0]
        x0, x1 = (r.next_batch()[0] for r in ranks)
        starts0, starts1 = set(x0[:, 0].tolist()), set(x1[:, 0].tolist())
        assert not starts0 & starts1  # different windows on each rank
        torch.testing.assert_close(torch.cat([x0, x1]), x_one)  # together: one process's batch


def test_nproc_is_taken_off_the_train_arguments():
    assert pop_nproc(["c.yaml", "--nproc", "4", "--n_layer=2"]) == (4, ["c.yaml", "--n_layer=2"])
    assert pop_nproc(["--nproc=2", "c.yaml"]) == (2, ["c.yaml"])
    assert pop_nproc(["c.yaml"]) == (1, ["c.yaml"])
    with pytest.raises(UserError, match="--nproc needs a positive number"):
        pop_nproc(["--nproc", "two"])
    command = torchrun_command(2, ["c.yaml"])
    assert command[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] + [
        "-m",
        "smallgpt",
        "train",
        "c.yaml",
    ]


def test_parallel_must_be_ddp_or_fsdp():
    with pytest.raises(UserError, match="parallel must be ddp or fsdp"):
        load_config(None, ["--dataset=d", "--parallel=zero3"]).validate()
