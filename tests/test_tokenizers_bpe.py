"""The bpe:N tokenizer (Hugging Face `tokenizers`), and bits per byte for every tokenizer kind."""

import json
import math
import sys

import numpy as np
import pytest

from smallgpt.config import load_config
from smallgpt.data.tokenizers import EOT, BPETokenizer, build_tokenizer, load_tokenizer, save_tokenizer
from smallgpt.errors import UserError
from smallgpt.preparation import PrepareArgs, run_prepare
from smallgpt.train.run import train

MIXED = "Mixed: 孙悟空 said «hello» — 😀 tab\tand\r\nCRLF ünïcödé <|endoftext|> 🇫🇷"


@pytest.fixture(scope="module")
def stories(shared_data) -> str:
    path = shared_data / "tinystories" / "tinystories_valid_prefix_eot.txt"
    return path.read_text(encoding="utf-8")[:200_000]


@pytest.fixture(scope="module")
def bpe(stories) -> BPETokenizer:
    return build_tokenizer("bpe:600", iter(stories.split("<|endoftext|>")))


def test_bpe_learns_the_requested_vocabulary_and_round_trips_any_text(bpe, stories):
    assert bpe.kind == "bpe" and bpe.vocab_size == 600 and bpe.eot_id == 599
    assert bpe.special_tokens == {EOT: 599}
    for text in (MIXED, stories[:3000], ""):
        ids = bpe.encode(text)
        assert bpe.decode(ids) == text
        assert all(0 <= i < 599 for i in ids)  # the EOT string is ordinary text, never the id
    assert len(bpe.encode(stories[:3000])) < 3000 / 2.5  # merges learned: well under a token per byte
    assert bpe.decode([*bpe.encode("a"), bpe.eot_id, *bpe.encode("b")]) == f"a{EOT}b"
    arrays = bpe.encode_batch_to_arrays(["Once upon a time", MIXED])
    assert [a.tolist() for a in arrays] == [bpe.encode("Once upon a time"), bpe.encode(MIXED)]


def test_bpe_saves_loads_and_trains_deterministically(bpe, stories, tmp_path):
    save_tokenizer(bpe, tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path)
    assert loaded.fingerprint() == bpe.fingerprint() and loaded.encode(MIXED) == bpe.encode(MIXED)
    hf = json.loads((tmp_path / "tokenizer.json").read_text())["tokenizer"]
    assert hf["model"]["type"] == "BPE"  # the Hugging Face tokenizer JSON, embedded
    again = build_tokenizer("bpe:600", iter(stories.split("<|endoftext|>")))
    assert again.fingerprint() == bpe.fingerprint()


@pytest.mark.parametrize("kind", ["bpe", "bpe:", "bpe:100", "bpe:4k"])
def test_bpe_needs_a_size_of_at_least_257(kind):
    with pytest.raises(UserError, match="at least 257"):
        build_tokenizer(kind, iter(["text"]))


def test_missing_tokenizers_package_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(UserError, match="pip install tokenizers"):
        build_tokenizer("bpe:300", iter(["text"]))


@pytest.mark.parametrize("kind", ["char", "gpt2", "bpe:300"])
def test_bits_per_byte_are_comparable_across_tokenizers(kind, tmp_path, shared_data):
    """Prepared counts hold every UTF-8 byte of the text; bpb = nats per token / ln 2 / bytes per token."""
    text = (shared_data / "chinese_novel" / "xiyouji.txt").read_text(encoding="utf-8-sig")[:6000]
    text += "\n" + (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:20000]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    data = tmp_path / "data"
    meta = run_prepare(PrepareArgs(input=str(corpus), out=str(data), tokenizer=kind))
    counts = meta["counts"]
    assert counts["bytes"]["train"] + counts["bytes"]["val"] == len(text.encode("utf-8"))
    tok = load_tokenizer(data)
    ids = np.concatenate([np.fromfile(data / f"{s}.bin", dtype=meta["dtype"]) for s in ("train", "val")])
    assert tok.decode([i for i in ids.tolist() if i != tok.eot_id]) == text
    config = load_config(
        None,
        [f"--dataset={data}", f"--out_dir={tmp_path / 'run'}", "--max_iters=0", "--eval_iters=2"]
        + "--block_size=16 --n_layer=1 --n_head=2 --n_embd=16 --progress=false --device=cpu".split(),
    )
    metrics = train(config)
    for split in ("train", "val"):
        bytes_per_token = counts["bytes"][split] / counts["tokens"][split]
        expected = metrics[f"{split}_loss"] / math.log(2) / bytes_per_token
        assert metrics[f"{split}_bpb"] == pytest.approx(expected)
