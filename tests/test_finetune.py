"""Fine-tuning a run (train/run.py's init_from=RUN): its weights and architecture, this run's
settings, a fresh optimizer; the data must use its tokenizer; the new run records where it started."""

import pytest
import torch
import yaml

from smallgpt.cli import main
from smallgpt.config import load_config
from smallgpt.data.loader import open_dataset
from smallgpt.errors import UserError
from smallgpt.runs import load_run
from smallgpt.train import checkpoint
from smallgpt.train.distributed import DistInfo
from smallgpt.train.run import samplers, train

QUIET = ["--progress=false", "--device=cpu", "--eval_iters=2", "--log_interval=1"]


def finetune_args(data, out_dir, init_from, *extra):
    return [f"--dataset={data}", f"--out_dir={out_dir}", f"--init_from={init_from}", *QUIET, *extra]


def first_logged_loss(run_dir) -> float:
    import json

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in records if r["event"] == "train" and r["iter"] == 0)


@pytest.mark.parametrize("lora", [[], ["--lora_rank=4"]])
def test_first_loss_is_the_base_models_loss_on_the_same_batch(base_run, char_data, tmp_path, lora):
    out = tmp_path / "ft"
    config = load_config(
        None, finetune_args(char_data, out, base_run, "--max_iters=2", "--batch_size=4", *lora)
    )
    train(config)
    # the first batch of this run, drawn as training draws it, through the base model untouched
    meta, _ = open_dataset(char_data)
    source, _ = samplers(config, char_data, meta, DistInfo(False, 0, 0, 1, torch.device("cpu")))
    x, y, mask = source.next_batch()
    base = checkpoint.load_model(base_run / "ckpt" / "best")
    with torch.no_grad():
        expected = base(x, y, loss_mask=mask)[1].item()
    assert first_logged_loss(out) == pytest.approx(expected, abs=1e-6)
    assert config.model.n_layer == base.config.n_layer and config.model.block_size == 32  # the base's


def test_the_run_records_and_shows_where_it_started(base_run, char_data, tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(["train", *finetune_args(char_data, out, base_run / "ckpt" / "last", "--max_iters=2")]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())["train"]
    base_ckpt = base_run / "ckpt" / "last"
    assert saved["init_from"] == str(base_ckpt)
    assert saved["init_from_fingerprint"] == checkpoint.fingerprint(base_ckpt)
    capsys.readouterr()
    load_run(out, torch.device("cpu"))
    shown = capsys.readouterr().err
    assert f"fine-tuned from {base_run} ckpt/last (sha256 {saved['init_from_fingerprint'][:12]})" in shown
    # the recorded fingerprint pins the base: the config run again on another base is refused
    other = tmp_path / "other"
    assert main(["train", *finetune_args(char_data, other, base_run, "--max_iters=1")]) == 0
    config = load_config(out / "config.yaml", [f"--out_dir={tmp_path / 'again'}", f"--init_from={other}"])
    with pytest.raises(UserError, match="has changed since init_from_fingerprint"):
        train(config)


def test_data_with_another_tokenizer_is_refused(base_run, shared_data, tmp_path, capsys, folder_hashes):
    data = tmp_path / "lccc"
    source = shared_data / "chitchat_lccc" / "toy_valid.txt"
    assert main(["prepare", "--input", str(source), "--out", str(data)]) == 0  # its own char vocabulary
    capsys.readouterr()
    before = folder_hashes(tmp_path)
    assert main(["train", *finetune_args(data, tmp_path / "ft", base_run, "--max_iters=1")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"--tokenizer-from {base_run}" in err
    assert folder_hashes(tmp_path) == before and not (tmp_path / "ft").exists()


def test_fine_tuning_a_run_over_itself_is_refused(base_run, char_data, tmp_path, capsys, folder_hashes):
    import shutil

    own = tmp_path / "own"
    shutil.copytree(base_run, own)
    before = folder_hashes(tmp_path)
    args = finetune_args(char_data, own, own, "--max_iters=1", "--lora_rank=4", "--overwrite")
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: init_from {own} is the run in out_dir: fine-tune it into another out_dir"
    assert folder_hashes(tmp_path) == before


@pytest.mark.parametrize("target", ["data", "empty"])
def test_init_from_a_folder_that_is_not_a_run_is_refused(char_data, tmp_path, capsys, target):
    folder = char_data if target == "data" else tmp_path / "empty"
    folder.mkdir(exist_ok=True)
    assert main(["train", *finetune_args(char_data, tmp_path / "ft", folder, "--max_iters=1")]) == 2
    err = capsys.readouterr().err.strip()
    not_a_run = "neither a smallgpt run (no ckpt/ folder) nor a Hugging Face model folder (no config.json)"
    assert err == f"error: init_from {folder} is {not_a_run}"
    assert not (tmp_path / "ft").exists()


def test_chat_data_from_a_base_with_room_for_the_chat_tokens(char_data, tmp_path, capsys):
    dialogues = tmp_path / "dialogues.txt"  # lccc-txt: one dialogue a line, turns split by tabs
    lines = [
        f"good day to you\tand good day to thee, sir {'abcdefg'[i % 7]}\tfare thee well" for i in range(60)
    ]
    dialogues.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tight, roomy = tmp_path / "tight", tmp_path / "roomy"
    for run, vocab_size in ((tight, 0), (roomy, 72)):  # the char vocabulary has 67 ids; chat adds 3
        args = [f"--dataset={char_data}", f"--out_dir={run}", "--max_iters=2", "--block_size=32"]
        assert (
            main(
                [
                    "train",
                    *args,
                    f"--vocab_size={vocab_size}",
                    "--n_layer=1",
                    "--n_head=2",
                    "--n_embd=32",
                    *QUIET,
                ]
            )
            == 0
        )
    for run in (tight, roomy):
        out = tmp_path / f"chat_{run.name}"
        prepare = ["prepare", "--input", str(dialogues), "--format", "lccc-txt", "--block-size", "32"]
        assert main([*prepare, "--tokenizer-from", str(run), "--out", str(out)]) == 0
    capsys.readouterr()
    chat = ["--loss_on=bot", "--max_iters=2"]
    assert main(["train", *finetune_args(tmp_path / "chat_tight", tmp_path / "ft1", tight, *chat)]) == 2
    err = capsys.readouterr().err
    assert (
        "adds special tokens at ids 67..69, past the 67 token embeddings" in err and "vocab_size=128" in err
    )
    assert main(["train", *finetune_args(tmp_path / "chat_roomy", tmp_path / "ft2", roomy, *chat)]) == 0
    assert checkpoint.read_model_config(tmp_path / "ft2" / "ckpt" / "last").vocab_size == 72
