import json
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import yaml

from smallgpt.config import load_config
from smallgpt.errors import TrainingDiverged, UserError
from smallgpt.experiments.metrics import events
from smallgpt.model.gpt import GPT
from smallgpt.preparation import PrepareArgs, run_prepare
from smallgpt.train import checkpoint
from smallgpt.train.run import train
from smallgpt.train.schedule import LRSchedule, lr_at
from smallgpt.train.trainer import Trainer, autocast_dtype, peak_flops

TINY = ["--block_size=32", "--n_layer=2", "--n_head=2", "--n_embd=32", "--batch_size=4", "--eval_iters=4"]
QUIET = ["--progress=false", "--device=cpu"]


def run(data, out_dir, *extra):
    config = load_config(None, [f"--dataset={data}", f"--out_dir={out_dir}", *TINY, *QUIET, *extra])
    return train(config)


def train_losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["event"] == "train"]


def test_training_lowers_loss_and_writes_the_run(char_data, tmp_path):
    metrics = run(char_data, tmp_path / "run", "--max_iters=60", "--eval_interval=30", "--learning_rate=3e-3")
    assert metrics["val_loss"] < 3.3  # from ~4.2 (uniform over 67 chars) in 60 tiny steps
    run_dir = tmp_path / "run"
    for name in (
        "config.yaml",
        "tokenizer.json",
        "metrics.jsonl",
        "ckpt/last/model.safetensors",
        "ckpt/best/state.pt",
    ):
        assert (run_dir / name).is_file(), name
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["iter"] for e in evals] == [0, 30, 60]
    assert all("val_bpb" in e and e["val_bpb"] > 0 for e in evals)
    assert {"loss", "lr", "tokens_per_sec", "ms_per_iter"} <= set(events[1])


@pytest.mark.parametrize(
    ("optimizer", "options"),
    [
        ("adamw", []),
        ("sophiag", []),
        ("muon", []),
        (
            "muon",
            ["--mlp=relu2", "--logit_softcap=15", "--decay_shape=wsd", "--qk_norm=true", "--pos_emb=rope"],
        ),
    ],
)
def test_resume_reproduces_the_uninterrupted_run(char_data, tmp_path, optimizer, options):
    common = [
        *options,
        f"--optimizer={optimizer}",
        "--hessian_interval=3",  # sophiag: Hessian estimates on both sides of the interruption
        "--eval_interval=10",
        "--lr_decay_iters=40",
        "--warmup_iters=5",
        "--log_interval=1",
        "--dropout=0.1",
    ]
    run(char_data, tmp_path / "full", "--max_iters=40", *common)
    run(char_data, tmp_path / "split", "--max_iters=20", *common)
    run(char_data, tmp_path / "split", "--max_iters=40", "--init_from=resume", *common)
    full, split = train_losses(tmp_path / "full"), train_losses(tmp_path / "split")
    assert len(full) == len(split) == 40
    assert full == pytest.approx(split, abs=1e-6)
    a = checkpoint.load_model(tmp_path / "full" / "ckpt" / "last")
    b = checkpoint.load_model(tmp_path / "split" / "ckpt" / "last")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, msg=name)


def test_gradient_accumulation_matches_a_bigger_batch(char_data, tmp_path):
    # 2 micro-steps of 4 sequences draw the same windows as one step of 8: same loss curve
    run(char_data, tmp_path / "a", "--max_iters=6", "--log_interval=1", "--gradient_accumulation_steps=2")
    run(char_data, tmp_path / "b", "--max_iters=6", "--log_interval=1", "--batch_size=8")
    accumulated, big = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert len(big) == 6 and big[-1] < big[0]
    assert accumulated == pytest.approx(big, abs=1e-5)


def test_max_seconds_stops_early_and_saves(char_data, tmp_path):
    run(char_data, tmp_path / "t", "--max_iters=100000", "--max_seconds=2", "--eval_interval=1000")
    state = checkpoint.load_state(tmp_path / "t" / "ckpt" / "last")
    assert 0 < state["iter_num"] < 100000


def test_lr_decay_by_seconds_ends_the_cosine_at_the_time_budget(char_data, tmp_path):
    run(
        char_data, tmp_path / "t", "--max_iters=100000", "--max_seconds=2", "--eval_interval=1000",
        "--lr_decay_by=seconds", "--learning_rate=1e-3", "--min_lr=1e-4", "--warmup_iters=5",
        "--log_interval=1",
    )  # fmt: skip
    lrs = [r["lr"] for r in events(tmp_path / "t", "train")]
    assert len(lrs) > 20 and max(lrs) == pytest.approx(1e-3, rel=0.05)
    assert lrs[-1] < 1.5e-4  # decayed to min_lr as the 2 s ran out, far from lr_decay_iters
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))


def test_lr_decay_by_seconds_needs_a_time_budget(char_data, tmp_path):
    with pytest.raises(UserError, match="lr_decay_by=seconds needs a positive max_seconds"):
        run(char_data, tmp_path / "t", "--lr_decay_by=seconds")
    with pytest.raises(UserError, match="lr_decay_by must be iters or seconds"):
        run(char_data, tmp_path / "t", "--lr_decay_by=time")


def test_eval_only_writes_nothing_into_the_run(char_data, tmp_path, folder_hashes):
    run_dir = tmp_path / "run"
    run(char_data, run_dir, "--max_iters=10", "--eval_interval=10")
    before = folder_hashes(run_dir)
    metrics = run(char_data, run_dir, "--init_from=resume", "--eval_only=true", "--eval_iters=8")
    assert metrics["val_loss"] > 0
    assert folder_hashes(run_dir) == before  # config.yaml, metrics.jsonl, checkpoints untouched


def test_training_into_a_trained_run_is_refused_and_touches_nothing(char_data, tmp_path, folder_hashes):
    run_dir = tmp_path / "run"
    run(char_data, run_dir, "--max_iters=4", "--eval_interval=2")
    before = folder_hashes(run_dir)
    for other in ([], ["--n_layer=3"], ["--init_from=scratch", "--overwrite=false"]):  # same or other shape
        with pytest.raises(UserError, match=f"{run_dir} already holds a trained run .*--overwrite"):
            run(char_data, run_dir, "--max_iters=1", *other)
    assert folder_hashes(run_dir) == before
    run(char_data, run_dir, "--max_iters=6", "--eval_interval=2", "--init_from=resume")  # resume still works
    assert checkpoint.load_state(run_dir / "ckpt" / "last")["iter_num"] == 6


def test_overwrite_replaces_the_run_whole(char_data, tmp_path):
    run_dir = tmp_path / "run"
    run(char_data, run_dir, "--max_iters=6", "--eval_interval=2", "--log_interval=1")
    # another architecture, and no evaluation after step 0: nothing of the old run may remain
    run(char_data, run_dir, "--max_iters=0", "--n_layer=3", "--overwrite")
    assert not (run_dir / "ckpt").exists()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["event"], r["iter"]) for r in records] == [("eval", 0)]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["n_layer"] == 3
    assert saved["train"]["overwrite"] is False  # training from config.yaml again must not replace the run
    run(char_data, run_dir, "--max_iters=2", "--eval_interval=2", "--n_layer=3", "--overwrite=true")
    assert checkpoint.load_model(run_dir / "ckpt" / "last").config.n_layer == 3


def test_overwrite_and_resume_contradict(char_data, tmp_path):
    with pytest.raises(UserError, match="pick one"):
        run(char_data, tmp_path / "run", "--init_from=resume", "--overwrite")


def test_resume_without_checkpoint_is_user_error(char_data, tmp_path):
    with pytest.raises(UserError, match="no ckpt/last"):
        run(char_data, tmp_path / "none", "--max_iters=1", "--init_from=resume")


def test_resume_with_other_tokenizer_is_user_error(char_data, tmp_path, shared_data):
    run(char_data, tmp_path / "r", "--max_iters=2", "--eval_interval=1")
    other = tmp_path / "xiyouji"
    run_prepare(PrepareArgs(input=str(shared_data / "chinese_novel" / "xiyouji.txt"), out=str(other)))
    with pytest.raises(UserError, match="different tokenizer"):
        run(other, tmp_path / "r", "--max_iters=4", "--init_from=resume")


def test_block_size_longer_than_corpus_is_user_error(tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("a tiny corpus, shorter than the context.\n" * 2)
    data = tmp_path / "short"
    run_prepare(PrepareArgs(input=str(text), out=str(data)))
    with pytest.raises(UserError, match="fewer than block_size"):
        run(data, tmp_path / "run", "--max_iters=1", "--block_size=64")


def test_lr_schedule_warmup_cosine_floor():
    config = load_config(
        None, ["--learning_rate=1.0", "--min_lr=0.1", "--warmup_iters=10", "--lr_decay_iters=110"]
    )
    schedule = LRSchedule.from_optim(config.optim)
    lrs = [lr_at(i, schedule) for i in range(200)]
    assert lrs[0] < lrs[9] < 1.0 and lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)  # halfway through the cosine
    assert lrs[110] == lrs[199] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    by_time = [lr_at(200, schedule, time_used=f) for f in (0.0, 0.5, 1.0, 3.0)]
    assert by_time == pytest.approx([1.0, 0.55, 0.1, 0.1])  # the cosine over the time budget
    assert lr_at(3, schedule, time_used=0.9) == lrs[3]  # warmup stays in iterations


def test_lr_schedule_wsd_holds_the_peak_then_cools_down_linearly():
    config = load_config(
        None,
        [
            "--learning_rate=1.0",
            "--min_lr=0.1",
            "--warmup_iters=10",
            "--lr_decay_iters=110",
            "--decay_shape=wsd",
            "--cooldown_frac=0.2",
        ],
    )
    schedule = LRSchedule.from_optim(config.optim)
    lrs = [lr_at(i, schedule) for i in range(200)]
    assert [lrs[10], lrs[50], lrs[90]] == pytest.approx([1.0] * 3)  # stable until 80% of the span
    assert lrs[100] == pytest.approx(0.55)  # halfway down the cooldown
    assert lrs[110] == lrs[199] == pytest.approx(0.1)
    by_time = [lr_at(200, schedule, time_used=f) for f in (0.5, 0.8, 0.9, 1.0)]
    assert by_time == pytest.approx([1.0, 1.0, 0.55, 0.1])


@pytest.mark.parametrize(
    ("key", "value"), [("decay_shape", "linear"), ("cooldown_frac", "0"), ("cooldown_frac", "1.5")]
)
def test_bad_schedule_values_are_user_errors(key, value):
    with pytest.raises(UserError, match=key):
        load_config(None, [f"--{key}={value}", "--dataset=x"]).validate()


def test_resume_takes_the_architecture_from_the_checkpoint_and_dropout_from_the_command_line(
    char_data, tmp_path
):
    run_dir = tmp_path / "run"
    run(char_data, run_dir, "--max_iters=4", "--eval_interval=2", "--dropout=0.0")
    # the architecture given again differs: the checkpoint's wins; dropout is a training setting
    run(
        char_data,
        run_dir,
        "--max_iters=8",
        "--eval_interval=2",
        "--init_from=resume",
        "--dropout=0.1",
        "--n_layer=3",
    )
    resumed = checkpoint.load_model(run_dir / "ckpt" / "last")
    assert (resumed.config.dropout, resumed.config.n_layer) == (0.1, 2)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (saved["model"]["dropout"], saved["model"]["n_layer"]) == (0.1, 2)
    assert checkpoint.load_state(run_dir / "ckpt" / "last")["iter_num"] == 8


def test_resume_reads_a_checkpoint_written_before_the_parallel_key(char_data, tmp_path):
    run(char_data, tmp_path / "old", "--max_iters=2", "--eval_interval=2")
    path = tmp_path / "old" / "ckpt" / "last" / checkpoint.STATE
    state = torch.load(path, weights_only=True)
    state["config"] = {"train": {"parallel": state.pop("parallel")}}  # the older layout
    torch.save(state, path)
    run(char_data, tmp_path / "old", "--max_iters=4", "--eval_interval=2", "--init_from=resume")
    assert checkpoint.load_state(tmp_path / "old" / "ckpt" / "last")["iter_num"] == 4


@pytest.mark.parametrize(
    "name, bf16, fp32",
    [
        ("NVIDIA H100 80GB HBM3", 989e12, 495e12),  # SXM
        ("NVIDIA H100 PCIe", 756e12, 378e12),
        ("NVIDIA H100 NVL", 835e12, 418e12),
        ("NVIDIA A100-SXM4-40GB", 312e12, 156e12),
        ("NVIDIA L40S", 362e12, 183e12),
        ("NVIDIA L40", 181e12, 90.5e12),  # not the L4's, which its name contains
        ("NVIDIA L4", 121e12, 60e12),
        ("NVIDIA A10", 125e12, 62.5e12),
        ("NVIDIA A100 80GB PCIe", 312e12, 156e12),  # not the A10's
        ("Tesla V100-PCIE-32GB", 112e12, 14e12),
        ("Tesla T4", 65e12, 8.1e12),
        ("NVIDIA GeForce RTX 3090", None, None),  # unknown: no MFU rather than a wrong one
    ],
)
def test_peak_flops_by_whole_device_name_and_dtype(monkeypatch, name, bf16, fp32):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    cuda = torch.device("cuda", 0)
    assert peak_flops(cuda, torch.bfloat16) == peak_flops(cuda, torch.float16) == bf16
    assert peak_flops(cuda, torch.float32) == fp32  # TF32 (fp32 without it): about half the bf16 peak
    assert peak_flops(torch.device("cpu"), torch.bfloat16) is None


def test_auto_dtype_is_float16_where_bfloat16_is_only_emulated(monkeypatch):
    """V100 and T4: torch.cuda.is_bf16_supported() is True by default, counting emulation."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert autocast_dtype("auto", torch.device("cuda", 0)) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # A100 on
    assert autocast_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16


def autocast_in_forward(monkeypatch) -> list[tuple[bool, bool, torch.dtype]]:
    """What each GPT forward sees: (training, CPU autocast on, its dtype)."""
    seen = []
    forward = GPT.forward

    def spy(self, *args, **kwargs):
        seen.append((self.training, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", spy)
    return seen


def test_cpu_bfloat16_autocasts_while_training(char_data, tmp_path, monkeypatch):
    """dtype bfloat16 on a CPU with native bf16: steps and evaluations run under bf16 autocast, the
    weights stay fp32, and the loss falls as in fp32."""
    monkeypatch.setattr(sys.modules[Trainer.__module__], "cpu_has_bf16", lambda: True)
    seen = autocast_in_forward(monkeypatch)
    metrics = run(
        char_data,
        tmp_path / "run",
        "--max_iters=60",
        "--eval_interval=30",
        "--learning_rate=3e-3",
        "--dtype=bfloat16",
    )
    assert seen.count((True, True, torch.bfloat16)) == 60  # every training step
    assert {autocast for _, autocast, _ in seen} == {True}  # and every evaluation
    assert not torch.is_autocast_enabled("cpu")
    assert metrics["val_loss"] < 3.3  # as the fp32 run of test_training_lowers_loss_and_writes_the_run
    weights = checkpoint.load_model(tmp_path / "run" / "ckpt" / "last", torch.device("cpu"))
    assert all(p.dtype == torch.float32 for p in weights.parameters())


@pytest.mark.parametrize("native", [False, True])
def test_cpu_bfloat16_says_when_the_cpu_has_none(char_data, tmp_path, monkeypatch, capsys, native):
    """Without native bf16 the run trains in fp32 (emulated bf16 is slower) and says so."""
    monkeypatch.setattr(sys.modules[Trainer.__module__], "cpu_has_bf16", lambda: native)
    seen = autocast_in_forward(monkeypatch)
    run(char_data, tmp_path / "run", "--max_iters=2", "--eval_interval=2", "--dtype=bfloat16")
    said = "no native bfloat16" in capsys.readouterr().err
    assert said == (not native)
    assert {autocast for _, autocast, _ in seen} == {native}


@pytest.mark.parametrize("has_compiler", [False, True])
def test_compile_without_a_cpp_compiler_trains_eagerly_and_says_so(
    char_data, tmp_path, monkeypatch, capsys, has_compiler
):
    """torch.compile on a CPU builds C++: without a compiler the run trains uncompiled, with a note."""
    trainer_module = sys.modules[Trainer.__module__]
    monkeypatch.setattr(trainer_module, "cpu_can_compile", lambda: has_compiler)
    compiled = []
    monkeypatch.setattr(trainer_module.distributed, "compiled", lambda model: compiled.append(1) or model)
    run(char_data, tmp_path / "run", "--max_iters=2", "--eval_interval=2", "--compile=true")
    said = capsys.readouterr()
    assert ("no C++ compiler found" in said.err) == (not has_compiler)
    assert compiled == ([1] if has_compiler else [])
    assert ("compiled the model in" in said.out + said.err) == has_compiler


def test_cpu_trains_in_float32_unless_asked():
    assert autocast_dtype("auto", torch.device("cpu")) == torch.float32
    assert autocast_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_float16_skips_a_nan_step_with_clipping_and_trains_on(char_data, tmp_path, nan_losses):
    """A skipped step ends the GradScaler's step too: else the next unscale_ raises (CPU GradScaler)."""
    nan_losses.add(3)
    args = ["--dtype=float16", "--grad_clip=1.0", "--nan_policy=skip", "--max_iters=6", "--eval_interval=6"]
    run(char_data, tmp_path / "run", *args, "--log_interval=1")
    state = checkpoint.load_state(tmp_path / "run" / "ckpt" / "last")
    assert state["iter_num"] == 6 and state["scaler"]["scale"] < 2.0**16  # backed off at the NaN step
    assert state["optimizer"]["state"][0]["step"] == 5  # every step but the NaN one


def test_float16_resumes_a_run_that_trained_without_a_scaler(char_data, tmp_path):
    run(char_data, tmp_path / "run", "--max_iters=2", "--eval_interval=2")  # float32: no scaler state
    run(
        char_data,
        tmp_path / "run",
        "--max_iters=4",
        "--eval_interval=2",
        "--init_from=resume",
        "--dtype=float16",
    )
    state = checkpoint.load_state(tmp_path / "run" / "ckpt" / "last")
    assert state["iter_num"] == 4 and state["scaler"]["scale"] == 2.0**16  # a fresh scaler


SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__")  # what makes the host wait for a GPU


def test_steps_between_log_steps_never_wait_for_the_device(char_data, tmp_path, monkeypatch):
    """Host syncs asked for by smallgpt's code, per optimizer step: only log steps have any."""
    per_step: list[int] = []  # syncs from the start of each step to the start of the next
    train_step = Trainer.train_step

    def counted_step(self):
        per_step.append(0)
        return train_step(self)

    def counting(name):
        original = getattr(torch.Tensor, name)

        def call(self, *args, **kwargs):
            if per_step and "smallgpt" in sys._getframe(1).f_code.co_filename:
                per_step[-1] += 1
            return original(self, *args, **kwargs)

        return call

    monkeypatch.setattr(Trainer, "train_step", counted_step)
    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    run(char_data, tmp_path / "run", "--max_iters=12", "--log_interval=4", "--eval_interval=1000")
    log_steps = {0, 4, 8}
    assert [n for i, n in enumerate(per_step) if i not in log_steps | {11}] == [0] * 8
    assert all(per_step[i] > 0 for i in log_steps)  # the divergence check and the logged loss


def test_a_nan_step_between_checks_never_reaches_a_checkpoint(char_data, tmp_path, nan_losses):
    """The loop reads the divergence guard at log steps and before checkpoints, not every step."""
    nan_losses.add(6)  # iteration 5: the next log step is 8, the next checkpoint 8
    with pytest.raises(TrainingDiverged, match="training diverged at iteration 5: the loss"):
        run(char_data, tmp_path / "run", "--max_iters=20", "--log_interval=8", "--eval_interval=4")
    assert checkpoint.load_state(tmp_path / "run" / "ckpt" / "last")["iter_num"] == 4


def test_ctrl_c_after_a_nan_step_saves_nothing(char_data, tmp_path, nan_losses, monkeypatch):
    nan_losses.add(6)  # iteration 5; Ctrl-C after iteration 6, no log step or checkpoint since
    monkeypatch.setattr(Trainer, "interrupted", lambda self: self.iter_num == 7)
    with pytest.raises(TrainingDiverged, match="at iteration 5"):
        run(char_data, tmp_path / "run", "--max_iters=20", "--log_interval=100", "--eval_interval=100")
    assert not (tmp_path / "run" / "ckpt").exists()


def test_compiling_is_not_training_time(char_data, tmp_path, monkeypatch):
    """The first step of a compiled run compiles: max_seconds and lr_decay_by=seconds leave it out."""
    trainer_module = sys.modules[Trainer.__module__]
    monkeypatch.setattr(trainer_module.distributed, "compiled", lambda model: model)  # no inductor here
    late = [0.0]  # the clock jumps 1000 s within the first step, as if it compiled that long
    monkeypatch.setattr(
        trainer_module, "time", SimpleNamespace(perf_counter=lambda: time.perf_counter() + late[0])
    )
    train_step = Trainer.train_step

    def first_step_compiles(self):
        late[0] = 1000.0
        return train_step(self)

    monkeypatch.setattr(Trainer, "train_step", first_step_compiles)
    args = ["--max_iters=3", "--eval_interval=3", "--max_seconds=900", "--lr_decay_by=seconds"]
    run(char_data, tmp_path / "run", *args, "--compile=true")
    state = checkpoint.load_state(tmp_path / "run" / "ckpt" / "last")
    assert state["iter_num"] == 3 and state["train_seconds"] < 100  # not over the 900 s budget at once
