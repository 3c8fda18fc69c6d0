"""Faults a long training run meets: kill -9 at any moment, Ctrl-C, divergence (NaN/inf), a full
disk, a second writer, a missing logging backend. Each leaves the run folder usable."""

import json
import math
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smallgpt.cli import main
from smallgpt.model.gpt import GPT
from smallgpt.train import checkpoint

SRC = Path(__file__).resolve().parents[1] / "src"
# a tiny model that evaluates and writes ckpt/best + ckpt/last at every step, so kills land in
# every part of the loop, checkpoint writes included; dropout makes the RNG state matter
ARGS = [
    "--block_size=16",
    "--n_layer=1",
    "--n_head=2",
    "--n_embd=16",
    "--batch_size=2",
    "--eval_iters=1",
    "--eval_interval=1",
    "--log_interval=1",
    "--dropout=0.1",
    "--learning_rate=3e-3",
    "--warmup_iters=5",
    "--lr_decay_iters=60",
    "--max_iters=60",
    "--progress=false",
    "--device=cpu",
]
TIMING = {"time", "ms_per_iter", "tokens_per_sec", "mfu"}  # differ between any two runs
KILLS = 10


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train_process(data: Path, run: Path, *extra: str, **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "smallgpt", "train", f"--dataset={data}", f"--out_dir={run}"]
    return subprocess.Popen([*command, *ARGS, *extra], env=env(), text=True, **popen)


def records(run: Path) -> list[dict]:
    """metrics.jsonl without the timing fields; strict JSON (a bare NaN fails here)."""

    def no_nan(name: str) -> None:
        raise AssertionError(f"metrics.jsonl holds {name}, which is not JSON")

    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(line, parse_constant=no_nan).items() if k not in TIMING}
        for line in lines
    ]


def assert_same_checkpoints(a: Path, b: Path) -> None:
    for name in ("best", "last"):
        wa, wb = (
            load_file(a / "ckpt" / name / "model.safetensors"),
            load_file(b / "ckpt" / name / "model.safetensors"),
        )
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key], wb[key]), f"ckpt/{name} {key}"


def has_checkpoint(run: Path) -> bool:
    return any((run / "ckpt" / name / "model.safetensors").is_file() for name in ("last", "last.old"))


@pytest.fixture(scope="module")
def uninterrupted(char_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    assert main(["train", f"--dataset={char_data}", f"--out_dir={run}", *ARGS]) == 0
    return run


def test_kill_9_at_random_moments_then_resume_ends_bit_identical(char_data, uninterrupted, tmp_path):
    run, rng, kills = tmp_path / "run", random.Random(15), []
    while True:
        resume = has_checkpoint(run)
        proc = train_process(
            char_data, run, f"--init_from={'resume' if resume else 'scratch'}", stdout=subprocess.PIPE
        )
        if len(kills) == KILLS:
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0, f"the last run failed; kills (s after start): {kills}"
            break
        assert proc.stdout is not None
        while not proc.stdout.readline().startswith("number of parameters"):  # the model is built
            assert proc.poll() is None, f"a run failed before training; kills: {kills}"
        delay = rng.uniform(0.0, 0.3)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        kills.append(round(delay, 3))
        proc.stdout.close()
    try:
        assert records(run) == records(uninterrupted)
        assert_same_checkpoints(run, uninterrupted)
        assert not list(run.rglob(".*.tmp")), "the last run removes what killed writes left"
    except AssertionError as e:
        raise AssertionError(f"{e}\nSIGKILL this long after training started, in order: {kills}") from None


def default_sigint() -> None:
    """Ctrl-C's default action in the child, even where the tests run with SIGINT ignored (a
    background job): Python then turns SIGINT into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_saves_ckpt_last_and_the_resumed_run_ends_bit_identical(char_data, uninterrupted, tmp_path):
    run = tmp_path / "run"
    proc = train_process(
        char_data, run, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint
    )
    assert proc.stdout is not None
    while not proc.stdout.readline().startswith("iter 5:"):
        assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted at iteration"), err
    saved = checkpoint.load_state(run / "ckpt" / "last")
    assert lines[0].startswith(f"interrupted at iteration {saved['iter_num']}: saved {run / 'ckpt' / 'last'}")
    assert not saved["evaluated"]  # between two steps, not right after an evaluation
    assert main(["train", f"--dataset={char_data}", f"--out_dir={run}", "--init_from=resume", *ARGS]) == 0
    assert records(run) == records(uninterrupted)
    assert_same_checkpoints(run, uninterrupted)


# ---- divergence ------------------------------------------------------------------------------------


def error_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def test_nan_stop_keeps_the_last_finite_checkpoint_and_exits_3(char_data, tmp_path, capsys):
    run = tmp_path / "run"
    common = [f"--dataset={char_data}", f"--out_dir={run}", *ARGS]
    assert main(["train", *common, "--max_iters=3"]) == 0
    capsys.readouterr()
    # the recipe: a huge learning rate and no clipping make the loss NaN within steps
    diverge = ["--init_from=resume", "--learning_rate=1e30", "--grad_clip=0", "--warmup_iters=0"]
    assert main(["train", *common, *diverge]) == 3
    err = error_lines(capsys)
    assert len(err) == 1 and err[0].startswith("error: training diverged at iteration"), err
    records(run)  # still strict JSON: NaN and inf are written as null
    for name in ("best", "last"):  # loading checks finiteness too, so these loads are the check
        model = checkpoint.load_model(run / "ckpt" / name)
        assert all(p.isfinite().all() for p in model.parameters())
    assert main(["sample", "--run", str(run), "--checkpoint", "last", "--max-new-tokens", "5"]) == 0


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


def test_a_nan_loss_stops_the_run_at_its_iteration(char_data, tmp_path, capsys, nan_losses):
    nan_losses.add(8)  # the 8th training step (iteration 7)
    run = tmp_path / "run"
    assert main(["train", f"--dataset={char_data}", f"--out_dir={run}", *ARGS]) == 3
    err = error_lines(capsys)
    assert len(err) == 1 and err[0].startswith("error: training diverged at iteration 7: the loss"), err
    assert "ckpt keeps the checkpoints from before it" in err[0]
    assert checkpoint.load_state(run / "ckpt" / "last")["iter_num"] == 7


def test_nan_skip_survives_one_bad_batch(char_data, tmp_path, capsys, nan_losses):
    nan_losses.add(8)  # the 8th training step (iteration 7)
    run = tmp_path / "run"
    args = [
        "train",
        f"--dataset={char_data}",
        f"--out_dir={run}",
        *ARGS,
        "--max_iters=12",
        "--nan_policy=skip",
    ]
    assert main(args) == 0
    assert "iter 7: the loss or gradient norm is NaN or inf; step skipped" in capsys.readouterr().out
    losses = {r["iter"]: r["loss"] for r in records(run) if r["event"] == "train"}
    assert losses[7] is None and all(math.isfinite(losses[i]) for i in losses if i != 7)
    state = checkpoint.load_state(run / "ckpt" / "last")
    assert state["iter_num"] == 12
    assert state["optimizer"]["state"][0]["step"] == 11  # AdamW took every step but the NaN one


def test_nan_skip_stops_after_too_many_bad_steps_in_a_row(char_data, tmp_path, capsys, nan_losses):
    nan_losses.update(range(4, 100))
    run = tmp_path / "run"
    policy = ["--nan_policy=skip", "--nan_max_consecutive=3"]
    assert main(["train", f"--dataset={char_data}", f"--out_dir={run}", *ARGS, *policy]) == 3
    err = error_lines(capsys)
    assert len(err) == 1 and "diverged at iteration 5" in err[0] and "3 steps in a row" in err[0], err
    # skipped steps leave the weights as they were: the evaluations at 4 and 5 saved iteration 3's
    assert checkpoint.load_state(run / "ckpt" / "last")["optimizer"]["state"][0]["step"] == 3


# ---- the run folder: one writer, full disk, missing backends -----------------------------------------

HOLD_LOCK = """import sys, time
from smallgpt.io import folder_lock
with folder_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def tree(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_second_writer_is_refused_until_the_first_dies(char_data, tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run)], env=env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        before = tree(run)
        args = ["train", f"--dataset={char_data}", f"--out_dir={run}", *ARGS, "--max_iters=2"]
        assert main(args) == 2
        err = error_lines(capsys)
        assert len(err) == 1 and f"is in use by process {holder.pid}" in err[0], err
        assert tree(run) == before  # nothing written: not config.yaml, not the lock file
    finally:
        holder.kill()  # kill -9: the kernel releases the lock
        holder.wait()
    assert main(args) == 0


def limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(char_data, tmp_path):
    run = tmp_path / "run"
    common = [f"--dataset={char_data}", f"--out_dir={run}", *ARGS]
    assert main(["train", *common, "--max_iters=2"]) == 0
    before = tree(run / "ckpt")
    weights = (run / "ckpt" / "last" / "model.safetensors").stat().st_size
    command = [sys.executable, "-m", "smallgpt", "train", *common, "--init_from=resume", "--max_iters=4"]
    # room for the logs and config, not for the weights
    result = subprocess.run(
        command, env=env(), capture_output=True, text=True, preexec_fn=limit_file_size(weights // 2)
    )
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot write checkpoint"), result.stderr
    assert "File too large" in err[0] and "the previous one is kept" in err[0]
    assert tree(run / "ckpt") == before  # no temp folder left either
    checkpoint.load_model(run / "ckpt" / "last")


@pytest.mark.parametrize(
    "flag, package", [("--wandb_log=true", "wandb"), ("--tensorboard=true", "tensorboard")]
)
def test_a_missing_logging_backend_fails_before_anything_is_written(
    char_data, tmp_path, capsys, monkeypatch, flag, package
):
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed: importing it fails
    run = tmp_path / "run"
    assert main(["train", f"--dataset={char_data}", f"--out_dir={run}", *ARGS, flag]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and f"{package} is not installed" in err[0], err
    assert not run.exists()
