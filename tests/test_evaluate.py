"""`smallgpt eval`: sliding-window scoring, bits per byte, the table, and bad input."""

import dataclasses
import gzip
import json
import math

import numpy as np
import pytest
import torch
from test_cli import assert_user_error

from smallgpt import evaluate
from smallgpt.cli import main
from smallgpt.config import load_config
from smallgpt.data.tokenizers import CharTokenizer
from smallgpt.evaluate import EvalArgs, run_eval, score_documents, short_names, windows
from smallgpt.experiments.metrics import events
from smallgpt.model import quantize as quantize_module
from smallgpt.model.gpt import GPT, ModelConfig
from smallgpt.preparation import PrepareArgs, run_prepare
from smallgpt.runs import load_run
from smallgpt.train.run import train
from smallgpt.train.trainer import lm_loss

BLOCK = 32
TINY = [f"--block_size={BLOCK}", "--n_layer=2", "--n_head=2", "--n_embd=32", "--learning_rate=3e-3"]
QUIET = ["--progress=false", "--device=cpu", "--warmup_iters=0"]


def train_run(text_file, root, tokenizer, *extra):
    data, run = root / f"data_{tokenizer}", root / f"run_{tokenizer}"
    run_prepare(PrepareArgs(input=str(text_file), tokenizer=tokenizer, out=str(data)))
    train(load_config(None, [f"--dataset={data}", f"--out_dir={run}", *TINY, *QUIET, *extra]))
    return data, run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shared_data):
    """The first 100,000 characters of tiny shakespeare: val is its last 10,000."""
    root = tmp_path_factory.mktemp("eval")
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:100_000]
    path = root / "shakespeare.txt"
    path.write_text(text, encoding="utf-8")
    return root, path


@pytest.fixture(scope="module")
def char_run(corpus):
    # eval_iters=400 x 8 windows x 32 tokens = 102k scored positions of a 10k-token val split, so the
    # trainer's random-window val_loss is an accurate estimate of the loss over the whole split
    root, path = corpus
    return train_run(path, root, "char", "--max_iters=150", "--eval_interval=150", "--eval_iters=400")


@pytest.fixture(scope="module")
def gpt2_run(corpus):
    root, path = corpus
    return train_run(path, root, "gpt2", "--max_iters=30", "--eval_interval=30", "--eval_iters=2")


def val_text(data, run):
    """The val split as text: its token ids decoded with the run's tokenizer, closing end-of-text cut."""
    _, tokenizer = load_run(run, torch.device("cpu"), "last")
    ids = np.fromfile(data / "val.bin", dtype=np.uint16)
    assert ids[-1] == tokenizer.eot_id and tokenizer.eot_id not in ids[:-1]  # one document
    return tokenizer.decode(ids[:-1].tolist()), ids


def test_eval_loss_on_the_val_split_matches_training_val_loss(char_run, tmp_path):
    data, run = char_run
    text, ids = val_text(data, run)
    (tmp_path / "val.txt").write_text(text, encoding="utf-8")
    [result] = run_eval(
        EvalArgs(
            run=[str(run)], input=[str(tmp_path / "val.txt")], stride=BLOCK, checkpoint="last", device="cpu"
        )
    )
    last_eval = events(run, "eval")[-1]  # ckpt/last holds the weights of the last evaluation
    assert result.score.tokens == len(ids) - 1
    # the trainer's val_loss averages random windows of val.bin; stride = block_size scores
    # non-overlapping windows, the same spread of context lengths (0..block_size-1) over every token
    assert result.score.loss == pytest.approx(last_eval["val_loss"], rel=0.01)
    assert result.score.bits_per_byte == pytest.approx(last_eval["val_bpb"], rel=0.01)

    # exactly: the trainer's own loss over those windows of [end-of-text, *val text]
    model, _ = load_run(run, torch.device("cpu"), "last")
    sequence = torch.from_numpy(np.concatenate(([ids[-1]], ids[:-1])).astype(np.int64))
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(sequence) - 1, BLOCK):
            x = sequence[start : start + BLOCK][None]
            y = sequence[start + 1 : start + BLOCK + 1][None]
            x = x[:, : y.size(1)]
            total += lm_loss(model, (x, y, None)).item() * y.size(1)
    assert result.score.nats == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize(
    "dtype, quantize, tolerance", [("bfloat16", "none", 0.01), ("float32", "int8", 0.02)]
)
def test_lower_precision_scores_close_to_float32(char_run, tmp_path, monkeypatch, dtype, quantize, tolerance):
    """--dtype / --quantize load through runs.py: bits per byte within 1% (bf16) / 2% (int8) of fp32."""
    monkeypatch.setattr(quantize_module, "cpu_has_bf16", lambda: True)  # whatever this CPU has
    data, run = char_run
    text, _ = val_text(data, run)
    (tmp_path / "val.txt").write_text(text, encoding="utf-8")
    args = EvalArgs(run=[str(run)], input=[str(tmp_path / "val.txt")], checkpoint="last", device="cpu")
    [full] = run_eval(args)
    [low] = run_eval(dataclasses.replace(args, dtype=dtype, quantize=quantize))
    assert low.score.tokens == full.score.tokens
    assert low.score.bits_per_byte == pytest.approx(full.score.bits_per_byte, rel=tolerance)
    assert low.score.bits_per_byte != full.score.bits_per_byte  # it did run in the other precision


@pytest.mark.parametrize("n, block, stride", [(10, 4, 2), (10, 4, 4), (3, 4, 1), (100, 32, 7), (33, 32, 32)])
def test_windows_score_every_token_once_with_the_most_context(n, block, stride):
    spans = windows(n, block, stride)
    scored = [t for _, end, first in spans for t in range(first, end)]
    assert scored == list(range(n))
    assert all(end - start <= block for start, end, _ in spans)
    assert spans[0][0] == spans[0][2] == 0  # the first window scores all of its tokens
    assert all(first - start == block - stride for start, _, first in spans[1:])  # context kept


def test_batching_and_padding_do_not_change_the_score(char_run):
    _, run = char_run
    model, tokenizer = load_run(run, torch.device("cpu"), "last")
    docs = ["First Citizen:\nBefore we proceed", "ROMEO:\n" * 20, "a", "What say you? " * 9]
    one = score_documents(model, tokenizer, docs, stride=5, batch_size=1)
    many = score_documents(model, tokenizer, docs, stride=5, batch_size=16)
    assert (one.tokens, one.documents) == (many.tokens, many.documents) == (sum(map(len, docs)), 4)
    assert one.nats == pytest.approx(many.nats, rel=1e-5)


def test_bits_per_byte_of_a_uniform_model():
    tokenizer = CharTokenizer("héllo wörd")
    model = GPT(ModelConfig(block_size=8, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=1, n_embd=8))
    torch.nn.init.zeros_(model.lm_head.weight)  # logits all 0: every id has probability 1 / V
    text = "héllo wörld héllo"  # 17 characters (tokens), 20 UTF-8 bytes (é twice, ö)
    score = score_documents(model.eval(), tokenizer, [text], stride=3)
    V = tokenizer.vocab_size
    assert (score.tokens, score.bytes) == (17, 20)
    assert score.loss == pytest.approx(math.log(V))
    assert score.perplexity == pytest.approx(V)
    assert score.bits_per_byte == pytest.approx(math.log2(V) * 17 / 20)


def test_char_and_gpt2_runs_in_one_table(char_run, gpt2_run, tmp_path, capsys, folder_hashes):
    text = "ROMEO:\nWhat light through yonder window breaks? 😀\n"  # the emoji is new to the char run
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    before = {run: folder_hashes(run) for run in (char_run[1], gpt2_run[1])}
    out = tmp_path / "results.json"
    args = ["eval", "--run", str(char_run[1]), "--run", str(gpt2_run[1]), "--input", str(tmp_path / "in.txt")]
    assert main([*args, "--json", str(out), "--device", "cpu"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == [
        "model",
        "tokenizer",
        "input",
        "context/stride",
        "tokens",
        "loss",
        "ppl",
        "bits/byte",
        "unk",
    ]
    char_row, gpt2_row = table[1].split(), table[2].split()
    # the runs and the input by their short names, not their long temporary paths (those are in --json)
    assert char_row[:3] == ["run_char", "char", "in.txt"] and gpt2_row[:3] == ["run_gpt2", "gpt2", "in.txt"]
    assert max(len(line) for line in table[:3]) < 100  # ~170 with the paths
    assert char_row[4] == str(len(text)) and int(gpt2_row[4]) < len(text)  # BPE: fewer tokens
    assert char_row[-1] == "1" and gpt2_row[-1] == "-"  # one unknown character; BPE has none
    assert any("scored as <|unk|>" in line for line in table)
    results = json.loads(out.read_text())
    assert [r["model"] for r in results] == [str(char_run[1]), str(gpt2_run[1])]
    assert [r["input"] for r in results] == [str(tmp_path / "in.txt")] * 2
    for r, row in zip(results, (char_row, gpt2_row)):
        assert r["bytes"] == len(text.encode()) and f"{r['bits_per_byte']:.4f}" == row[7]
        assert r["bits_per_byte"] == pytest.approx(r["nats"] / math.log(2) / r["bytes"])
    assert {run: folder_hashes(run) for run in before} == before  # eval writes nothing into a run


def test_short_names_are_the_shortest_ends_that_tell_paths_apart():
    paths = ["/tmp/a/run", "/tmp/b/run", "runs/shakespeare", "gpt2", "/x/b/run/c", "c"]
    assert short_names(paths) == {
        "/tmp/a/run": "a/run",
        "/tmp/b/run": "b/run",
        "runs/shakespeare": "shakespeare",
        "gpt2": "gpt2",
        "/x/b/run/c": "run/c",
        "c": "c",  # a path that ends another one stays whole
    }


def test_json_path_is_checked_before_any_scoring(char_run, tmp_path, capsys, monkeypatch):
    def no_scoring(*args, **kwargs):
        raise AssertionError("scored before checking --json")

    monkeypatch.setattr(evaluate, "score_documents", no_scoring)
    (tmp_path / "in.txt").write_text("hello")
    args = ["eval", "--run", str(char_run[1]), "--input", str(tmp_path / "in.txt"), "--device", "cpu"]
    assert_user_error(capsys, [*args, "--json", str(tmp_path)], f"cannot write {tmp_path}: it is a folder")


def test_folder_input_scores_each_document(char_run, tmp_path):
    _, run = char_run
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("First Citizen:\nSpeak.", encoding="utf-8")
    (folder / "b.txt").write_text("All:\nSpeak, speak.<|endoftext|>MENENIUS:\nWhy?", encoding="utf-8")
    [result] = run_eval(EvalArgs(run=[str(run)], input=[str(folder)], device="cpu"))
    assert result.score.documents == 3  # a file is a document; prepare's <|endoftext|> markers split one
    model, tokenizer = load_run(run, torch.device("cpu"), "best")
    docs = ["First Citizen:\nSpeak.", "All:\nSpeak, speak.", "MENENIUS:\nWhy?"]
    assert result.score.nats == pytest.approx(score_documents(model, tokenizer, docs).nats, rel=1e-6)


def test_records_of_jsonl_and_compressed_inputs_are_documents(char_run, tmp_path):
    _, run = char_run
    docs = ["First Citizen:\nSpeak.", "All:\nSpeak, speak.", "MENENIUS:\nWhy?"]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs), encoding="utf-8")
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write(docs[0])
    args = EvalArgs(
        run=[str(run)], input=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt.gz")], device="cpu"
    )
    records, compressed = run_eval(dataclasses.replace(args, text_field="body"))
    model, tokenizer = load_run(run, torch.device("cpu"), "best")
    assert records.score.documents == 3 and compressed.score.documents == 1
    assert records.score.nats == pytest.approx(score_documents(model, tokenizer, docs).nats, rel=1e-6)
    assert compressed.score.nats == pytest.approx(score_documents(model, tokenizer, docs[:1]).nats, rel=1e-6)


@pytest.mark.parametrize(
    "name, content, extra, fragments",
    [
        (None, None, [], ["--input"]),
        ("in.txt", b"", [], ["empty"]),
        ("in.txt", b"caf\xe9 au lait", [], ["UTF-8"]),
        ("in.txt", b"hello", ["--stride", "0"], ["--stride", "positive"]),
        ("in.txt", b"hello", ["--stride", str(BLOCK + 1)], ["--stride", f"context of {BLOCK}"]),
        ("in.txt", b"hello", ["--batch-size", "0"], ["--batch-size"]),
        ("in.jsonl", b'{"text": "hi"}\n', ["--text-field", "body"], ["body"]),
        ("in.txt.gz", b"not gzip", [], ["in.txt.gz"]),
    ],
)
def test_bad_input_is_one_line(char_run, tmp_path, capsys, name, content, extra, fragments):
    inputs = []
    if name is not None:
        (tmp_path / name).write_bytes(content)
        inputs = ["--input", str(tmp_path / name)]
    assert_user_error(
        capsys, ["eval", "--run", str(char_run[1]), *inputs, *extra, "--device", "cpu"], *fragments
    )


def test_unknown_run_or_input_is_one_line(tmp_path, capsys):
    (tmp_path / "in.txt").write_text("hello")
    assert_user_error(
        capsys, ["eval", "--run", str(tmp_path / "nope"), "--input", str(tmp_path / "in.txt")], "nope"
    )
    assert_user_error(
        capsys, ["eval", "--run", str(tmp_path), "--input", str(tmp_path / "missing.txt")], "missing.txt"
    )
    assert_user_error(capsys, ["eval", "--input", str(tmp_path / "in.txt")], "--run")
