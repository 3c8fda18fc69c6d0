"""Faults a long training run meets: kill -9 at any moment, Ctrl-C, divergence (NaN/inf), a full
disk, a second writer, a missing logging backend. Each leaves the run folder usable."""

import json
import math
import multiprocessing
import os
import random
import resource
import signal
import sys
import time
from collections.abc import Callable
from functools import partial
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smallgpt.cli import main
from smallgpt.io import folder_lock
from smallgpt.train import checkpoint

# runs that must be killed are forked from this process: no interpreter start, no torch import
FORK = multiprocessing.get_context("fork")
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


def _main_in_child(argv: list[str], stderr: Path | None, setup: Callable[[], object] | None) -> None:
    with open(os.devnull, "w") as out, open(stderr or os.devnull, "w") as err:
        sys.stdout, sys.stderr = out, err
        if setup is not None:
            setup()
        code = main(argv)
    os._exit(code)


def start_training(
    data: Path, run: Path, *extra: str, stderr: Path | None = None, setup: Callable[[], object] | None = None
) -> BaseProcess:
    """`smallgpt train` in a forked process; its stderr goes to the file `stderr`, `setup` runs first."""
    argv = ["train", f"--dataset={data}", f"--out_dir={run}", *ARGS, *extra]
    process = FORK.Process(target=_main_in_child, args=(argv, stderr, setup))
    process.start()
    return process


def finish(process: BaseProcess) -> int | None:
    process.join(timeout=120)
    return process.exitcode


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


def checkpoint_iteration(run: Path) -> int:
    """The iteration the run would resume at (0 with no checkpoint yet)."""
    for name in ("last", "last.old"):
        if (run / "ckpt" / name / checkpoint.STATE).is_file():
            return checkpoint.load_state(run / "ckpt" / name)["iter_num"]
    return 0


@pytest.fixture(scope="module")
def uninterrupted(char_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    assert main(["train", f"--dataset={char_data}", f"--out_dir={run}", *ARGS]) == 0
    return run


def full_run_seconds(data: Path, run: Path) -> float:
    """Wall time of one whole forked run: kills are spread over it, whatever the machine's speed."""
    start = time.monotonic()
    assert finish(start_training(data, run)) == 0
    return time.monotonic() - start


def test_kill_9_at_random_moments_then_resume_ends_bit_identical(char_data, uninterrupted, tmp_path):
    run, rng, kills = tmp_path / "run", random.Random(15), []
    # each run lives at most a tenth of a whole run, so ten of them cannot finish it (a resume also
    # loads and redoes the step in flight); still, every run gets past loading into the steps
    window = full_run_seconds(char_data, tmp_path / "timing") / KILLS
    for _ in range(KILLS):
        init = "resume" if has_checkpoint(run) else "scratch"
        process = start_training(char_data, run, f"--init_from={init}")
        delay = rng.uniform(0.0, window)  # loading, evaluating, stepping, checkpointing: anywhere
        time.sleep(delay)
        process.kill()
        process.join()
        kills.append((round(delay, 3), init, process.exitcode))
    reached = checkpoint_iteration(run)
    assert main(["train", f"--dataset={char_data}", f"--out_dir={run}", *ARGS, "--init_from=resume"]) == 0
    try:
        assert all(code == -signal.SIGKILL for _, _, code in kills), "a run ended before its kill"
        assert reached > 0, "the killed runs saved no step: no kill landed past loading"
        assert records(run) == records(uninterrupted)
        assert_same_checkpoints(run, uninterrupted)
        assert not list(run.rglob(".*.tmp")), "the last run removes what killed writes left"
    except AssertionError as e:
        raise AssertionError(
            f"{e}\n(seconds after start, init_from, exit code) of each kill: {kills}; "
            f"kill window {window:.3f} s; killed runs reached iteration {reached}"
        ) from None


def test_ctrl_c_saves_ckpt_last_and_the_resumed_run_ends_bit_identical(char_data, uninterrupted, tmp_path):
    run, stderr, metrics = tmp_path / "run", tmp_path / "stderr.txt", tmp_path / "run" / "metrics.jsonl"
    # Python's Ctrl-C handler, also where the tests run with SIGINT ignored (a background job)
    python_sigint = partial(signal.signal, signal.SIGINT, signal.default_int_handler)
    process = start_training(char_data, run, stderr=stderr, setup=python_sigint)
    deadline = time.monotonic() + 60
    while not metrics.is_file() or '"iter": 5,' not in metrics.read_text():
        assert time.monotonic() < deadline and process.is_alive()
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGINT)
    assert finish(process) == 130
    saved = checkpoint.load_state(run / "ckpt" / "last")
    said = f"interrupted at iteration {saved['iter_num']}: saved {run / 'ckpt' / 'last'}; continue with"
    lines = stderr.read_text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(said), lines
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


def hold_lock(folder: Path, locked: Event) -> None:
    with folder_lock(folder):
        locked.set()
        time.sleep(120)


def tree(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_second_writer_is_refused_until_the_first_dies(char_data, tmp_path, capsys):
    run, locked = tmp_path / "run", FORK.Event()
    holder = FORK.Process(target=hold_lock, args=(run, locked))
    holder.start()
    try:
        assert locked.wait(timeout=60)
        before = tree(run)
        args = ["train", f"--dataset={char_data}", f"--out_dir={run}", *ARGS, "--max_iters=2"]
        assert main(args) == 2
        err = error_lines(capsys)
        assert len(err) == 1 and f"is in use by process {holder.pid}" in err[0], err
        assert tree(run) == before  # nothing written: not config.yaml, not the lock file
    finally:
        holder.kill()  # kill -9: the kernel releases the lock
        holder.join()
    assert main(args) == 0


def limit_file_size(limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(char_data, tmp_path):
    run, stderr = tmp_path / "run", tmp_path / "stderr.txt"
    assert main(["train", f"--dataset={char_data}", f"--out_dir={run}", *ARGS, "--max_iters=2"]) == 0
    before = tree(run / "ckpt")
    weights = (run / "ckpt" / "last" / "model.safetensors").stat().st_size
    limit = partial(limit_file_size, weights // 2)  # room for the logs and config, not for the weights
    process = start_training(
        char_data, run, "--init_from=resume", "--max_iters=4", stderr=stderr, setup=limit
    )
    assert finish(process) == 2
    err = stderr.read_text().strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot write checkpoint"), err
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
