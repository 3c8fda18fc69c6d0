"""The command line end to end: the happy path, and every bad input as one line with exit code 2."""

import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from conftest import TINY_TRAINING

from smallgpt.cli import build_parser, main
from smallgpt.config import Config, field_docs
from smallgpt.model import quantize

SRC = Path(__file__).resolve().parents[1] / "src"
TINY = ["--block_size=32", *TINY_TRAINING]


def smallgpt(*args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run(
        [sys.executable, "-m", "smallgpt", *args],
        capture_output=True,
        text=True,
        input=stdin,
        env=env,
        cwd=cwd,
    )


def assert_user_error(capsys, args: list[str], *fragments: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in err[0], err[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_data):
    """A tiny char model on tiny shakespeare, trained through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    data, run = root / "data", root / "run"
    assert (
        main(["prepare", "--input", str(shared_data / "tinyshakespeare" / "input.txt"), "--out", str(data)])
        == 0
    )
    args = ["train", f"--dataset={data}", f"--out_dir={run}", "--max_iters=30", "--eval_interval=15", *TINY]
    assert main(args) == 0
    return data, run


def test_sample_prints_text_like_the_corpus(trained, capsys):
    _, run = trained
    capsys.readouterr()
    assert (
        main(
            ["sample", "--run", str(run), "--start", "ROMEO:", "--num-samples", "2", "--max-new-tokens", "40"]
        )
        == 0
    )
    out = capsys.readouterr().out
    samples = out.split("---------------")
    assert len(samples) == 3 and samples[0].startswith("ROMEO:")
    assert len(samples[0]) > 20


@pytest.mark.parametrize(
    "flags", [["--dtype", "bfloat16"], ["--quantize", "int8"], ["--dtype", "bfloat16", "--quantize", "int8"]]
)
def test_sample_with_lower_precision_weights(trained, capsys, monkeypatch, flags):
    """--dtype / --quantize go through runs.py's loading path: the sampled text is the corpus's
    kind, and greedy decoding agrees with fp32's on the first tokens."""
    monkeypatch.setattr(quantize, "cpu_has_bf16", lambda: True)  # whatever this machine's CPU has
    _, run = trained
    texts = []
    for extra in ([], flags):
        capsys.readouterr()
        args = ["sample", "--run", str(run), "--start", "ROMEO:", "--num-samples", "1", "--temperature", "0"]
        assert main([*args, "--max-new-tokens", "30", *extra]) == 0
        texts.append(capsys.readouterr().out.split("---------------")[0])
    assert texts[1].startswith("ROMEO:") and len(texts[1]) > 20
    assert texts[1][:12] == texts[0][:12]


def test_bad_precision_flags_are_user_errors(trained, capsys):
    _, run = trained
    assert_user_error(capsys, ["sample", "--run", str(run), "--quantize", "int4"], "quantize must be one of")
    assert_user_error(capsys, ["sample", "--run", str(run), "--dtype", "float16"], "float16 is for GPUs")


def test_sampling_is_reproducible_by_seed(trained, capsys):
    _, run = trained
    outputs = []
    for seed in ("1", "1", "2"):
        capsys.readouterr()
        main(["sample", "--run", str(run), "--num-samples", "1", "--max-new-tokens", "60", "--seed", seed])
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] != outputs[2]


def test_kv_cache_and_full_recompute_sample_the_same_text(trained, capsys):
    _, run = trained
    texts = []
    for flag in ("--kv-cache", "--no-kv-cache"):
        capsys.readouterr()
        main(
            [
                "sample",
                "--run",
                str(run),
                "--num-samples",
                "1",
                "--max-new-tokens",
                "25",
                "--temperature",
                "0",
                flag,
            ]
        )
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1]


def test_start_from_file_and_continue_session(trained, tmp_path):
    _, run = trained
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("KING:\n")
    result = smallgpt(
        "sample",
        "--run",
        str(run),
        "--start",
        f"FILE:{prompt}",
        "--num-samples",
        "1",
        "--max-new-tokens",
        "10",
    )
    assert result.returncode == 0 and result.stdout.startswith("KING:\n")
    session = smallgpt(
        "continue", "--run", str(run), "--max-new-tokens", "12", stdin="First\nc\nn\nSecond\nq\n"
    )
    assert session.returncode == 0, session.stderr
    assert (
        session.stdout.count("[c]ontinue") == 3 and "First" in session.stdout and "Second" in session.stdout
    )


def test_unseen_characters_in_start_are_read_as_unk_with_a_note(trained, capsys):
    """As on every surface (docs/chat.md#characters-the-model-never-saw): not an error."""
    _, run = trained
    args = ["sample", "--run", str(run), "--start", "西游记 ", "--num-samples", "1", "--max-new-tokens", "5"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert out.startswith("西游记 ")
    assert err == "note: 3 character(s) the model never saw are read as <|unk|>: '西', '游', '记'\n"


@pytest.mark.parametrize(
    "make, fragments",
    [
        (lambda d: d / "missing.txt", ["does not exist"]),
        (lambda d: (d / "empty.txt").write_text("") and d / "empty.txt" or d / "empty.txt", ["empty"]),
        (
            lambda d: (d / "bad.txt").write_bytes(b"ok\n\xff\xfe broken") and d / "bad.txt",
            ["not valid UTF-8"],
        ),
    ],
    ids=["missing", "empty", "undecodable"],
)
def test_prepare_bad_input(tmp_path, capsys, make, fragments):
    path = make(tmp_path)
    out = tmp_path / "out"
    assert_user_error(
        capsys, ["prepare", "--input", str(path), "--out", str(out)], str(path.name), *fragments
    )
    assert not out.exists()


def test_bad_input_through_a_real_process_has_no_traceback(tmp_path):
    result = smallgpt("prepare", "--input", str(tmp_path / "nope.txt"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("--n_layr=2", "did you mean 'n_layer'"),
        ("--batch_size=-4", "batch_size must be positive"),
        ("--n_embd=0", "n_embd must be positive"),
        ("--n_embd=33", "divisible by n_head"),
    ],
)
def test_train_bad_config(trained, tmp_path, capsys, override, fragment):
    data, _ = trained
    run = tmp_path / "run"
    assert_user_error(capsys, ["train", f"--dataset={data}", f"--out_dir={run}", *TINY, override], fragment)
    assert not (run / "ckpt").exists()


def test_corpus_shorter_than_context(tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("To be, or not to be.\n")
    assert main(["prepare", "--input", str(text), "--out", str(tmp_path / "d")]) == 0
    assert_user_error(
        capsys, ["train", f"--dataset={tmp_path / 'd'}", *TINY], "fewer than block_size", "train.bin"
    )


def test_missing_dataset_and_config_file(capsys, tmp_path):
    assert_user_error(capsys, ["train", f"--dataset={tmp_path / 'none'}", *TINY], "not found")
    assert_user_error(capsys, ["train", str(tmp_path / "none.yaml")], "none.yaml", "does not exist")


def test_sample_from_run_without_checkpoint(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert_user_error(capsys, ["sample", "--run", str(tmp_path / "run")], "no checkpoint")


def test_sample_from_a_file_says_it_is_not_a_run_folder(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("a file")
    assert_user_error(capsys, ["sample", "--run", str(tmp_path / "notes.txt")], "is a file, not a run folder")


@pytest.mark.parametrize(
    "args, closest, verb",
    [
        (["sample", "--run", "r", "--tempreature", "0.5"], "--temperature", "sample"),
        (["sample", "--run", "r", "--max_new_tokenz=4"], "--max-new-tokens", "sample"),  # nanoGPT's spelling
        (["classify", "predict", "--run", "r", "--fille", "x"], "--file", "classify predict"),
    ],
)
def test_an_unknown_flag_of_a_verb_names_its_closest_flag_and_the_verbs_help(capsys, args, closest, verb):
    assert_user_error(capsys, args, f"did you mean {closest}?", f"(see smallgpt {verb} --help)")


def copy_run(run: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(run, dest)
    return dest


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_checkpoint(trained, tmp_path, capsys, damage):
    run = copy_run(trained[1], tmp_path / "run")
    for name in ("best", "last"):
        weights = run / "ckpt" / name / "model.safetensors"
        blob = weights.read_bytes()
        weights.write_bytes(blob[: len(blob) // 2] if damage == "truncate" else b"\x00garbage" * 100)
    assert_user_error(capsys, ["sample", "--run", str(run)], "model.safetensors", "corrupted")


def test_truncated_training_state_cannot_resume(trained, tmp_path, capsys):
    data, original = trained
    run = copy_run(original, tmp_path / "run")
    state = run / "ckpt" / "last" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    args = ["train", f"--dataset={data}", f"--out_dir={run}", "--init_from=resume", "--max_iters=40", *TINY]
    assert_user_error(capsys, args, "state.pt", "corrupted")


def test_tokenizer_that_does_not_match_the_checkpoint(trained, tmp_path, capsys, shared_data):
    data, original = trained
    run = copy_run(original, tmp_path / "run")
    other = tmp_path / "xiyouji"
    assert (
        main(["prepare", "--input", str(shared_data / "chinese_novel" / "xiyouji.txt"), "--out", str(other)])
        == 0
    )
    (run / "tokenizer.json").write_bytes((other / "tokenizer.json").read_bytes())
    assert_user_error(capsys, ["sample", "--run", str(run)], "tokenizer.json", "not the tokenizer")
    args = ["train", f"--dataset={other}", f"--out_dir={run}", "--init_from=resume", "--max_iters=40", *TINY]
    assert_user_error(capsys, args, "different tokenizer")


def test_train_help_explains_every_config_key(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert re.search(r"^  n_layer=6 +transformer blocks$", out, re.M)
    assert re.search(r"^  norm=layernorm +layernorm \| rmsnorm$", out, re.M)  # the allowed values
    assert re.search(r"^  compile=false +torch.compile the model$", out, re.M)
    for section in fields(Config):
        docs = field_docs(type(getattr(Config(), section.name)))
        undocumented = [f.name for f in fields(section.default_factory()) if not docs.get(f.name)]
        assert not undocumented, f"{section.name} keys without a docstring: {undocumented}"


def test_verb_help_lists_one_spelling_per_flag_and_two_per_boolean(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    out = capsys.readouterr().out
    assert "--kv-cache, --no-kv-cache" in out and "kv_cache" not in out
    assert "--max-new-tokens" in out and "--max_new_tokens" not in out
    args = [
        "sample",
        "--max_new_tokens",
        "3",
        "--no-kv_cache",
        "--run",
        "r",
    ]  # nanoGPT's spelling still works
    ns = build_parser().parse_args(args)
    assert (ns.max_new_tokens, ns.kv_cache) == (3, False)
