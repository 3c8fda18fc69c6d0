"""nanoGPT data folders as `dataset=`: train.bin / val.bin of uint16 ids with a char meta.pkl (as
nanoGPT's shakespeare_char prepare script writes them) or without one (GPT-2 tokens), and a meta.pkl
that would run code when unpickled freely is refused without running it."""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from test_cli import TINY, assert_user_error

from smallgpt.cli import main
from smallgpt.data.nanogpt import nanogpt_dataset, read_plain_pickle
from smallgpt.data.tokenizers import GPT2Tokenizer, NanoGPTCharTokenizer, load_tokenizer, tokenizer_from_dict
from smallgpt.errors import UserError


def write_shakespeare_char(folder: Path, text: str) -> dict:
    """nanoGPT's data/shakespeare_char layout: sorted characters, ids from 0, a 90/10 split, uint16
    token files and meta.pkl holding a plain dict."""
    folder.mkdir(parents=True)
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}
    n = int(len(text) * 0.9)
    for name, part in (("train", text[:n]), ("val", text[n:])):
        np.array([stoi[c] for c in part], dtype=np.uint16).tofile(folder / f"{name}.bin")
    meta = {"vocab_size": len(chars), "itos": itos, "stoi": stoi}
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)
    return meta


@pytest.fixture(scope="module")
def shakespeare(shared_data) -> str:
    return (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:200_000]


def train_and_sample(capsys, data: Path, run: Path, *extra: str) -> str:
    args = ["train", f"--dataset={data}", f"--out_dir={run}", "--max_iters=20", "--eval_interval=10"]
    assert main([*args, *TINY, *extra]) == 0
    capsys.readouterr()
    sample = ["sample", "--run", str(run), "--num-samples", "1", "--max-new-tokens", "80", "--device", "cpu"]
    assert main(sample) == 0
    return capsys.readouterr().out


def test_shakespeare_char_folder_trains_and_samples(tmp_path, capsys, shakespeare):
    data = tmp_path / "data" / "shakespeare_char"
    meta = write_shakespeare_char(data, shakespeare)
    out = train_and_sample(capsys, data, tmp_path / "run")
    assert set(out) <= set(meta["itos"].values()) | {"\n", "-", " "} and len(out.strip()) > 20

    tok = load_tokenizer(tmp_path / "run")  # the run keeps nanoGPT's ids
    assert isinstance(tok, NanoGPTCharTokenizer) and tok.vocab_size == meta["vocab_size"] + 1
    train = np.fromfile(data / "train.bin", dtype=np.uint16)
    assert tok.encode(shakespeare[:500]) == train[:500].tolist()
    assert tok.decode(train[:500].tolist()) == shakespeare[:500]


def test_dataset_name_resolves_under_data_like_nanogpt(tmp_path, capsys, shakespeare, monkeypatch):
    write_shakespeare_char(tmp_path / "data" / "shakespeare_char", shakespeare)
    monkeypatch.chdir(tmp_path)
    args = ["train", "--dataset=shakespeare_char", f"--out_dir={tmp_path / 'run'}", "--max_iters=2", *TINY]
    assert main(args) == 0


def test_gpt2_folder_without_meta_pkl(tmp_path, capsys, shakespeare):
    data = tmp_path / "shakespeare"
    data.mkdir()
    gpt2 = GPT2Tokenizer()
    n = int(len(shakespeare) * 0.9)
    for name, part in (("train", shakespeare[:n]), ("val", shakespeare[n:])):
        np.array(gpt2.encode(part), dtype=np.uint16).tofile(data / f"{name}.bin")
    meta, tok = nanogpt_dataset(data)
    assert tok.kind == "gpt2" and meta["tokenizer"]["fingerprint"] == gpt2.fingerprint()
    out = train_and_sample(capsys, data, tmp_path / "run", "--n_embd=16", "--n_head=2")
    assert out.strip() and load_tokenizer(tmp_path / "run").kind == "gpt2"


class Greeting:
    """An ordinary class: its instance pickles by naming it."""

    def __init__(self) -> None:
        self.text = "hello"


class RunsACommand:
    """A pickle that calls os.system while it is loaded, if an unpickler lets it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("payload", ["instance", "os.system"])
def test_meta_pkl_with_more_than_plain_data_is_refused_unexecuted(tmp_path, capsys, shakespeare, payload):
    data = tmp_path / "data"
    meta = write_shakespeare_char(data, shakespeare[:20_000])
    marker = tmp_path / "pwned"
    meta["extra"] = Greeting() if payload == "instance" else RunsACommand(marker)
    (data / "meta.pkl").write_bytes(pickle.dumps(meta))
    named = "Greeting" if payload == "instance" else "system"
    run = tmp_path / "run"
    assert_user_error(capsys, ["train", f"--dataset={data}", f"--out_dir={run}", *TINY], "meta.pkl", named)
    assert not marker.exists() and not run.exists()
    if payload == "os.system":  # the same file, unpickled freely, would have run the command
        pickle.loads((data / "meta.pkl").read_bytes())
        assert marker.exists()


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"\x80\x04 not a pickle", "not a readable pickle"),
        (pickle.dumps({"vocab_size": 65}), "no character vocabulary"),
        (pickle.dumps({"itos": {0: "a", 1: "bc"}}), "no character vocabulary"),
        (pickle.dumps({"itos": {0: "a", 1: "b"}, "stoi": {"a": 1, "b": 0}}), "does not agree"),
        (pickle.dumps({"itos": {0: "a", 1: "b"}}), "outside meta.pkl's vocabulary of 3 ids"),
    ],
)
def test_unusable_meta_pkl(tmp_path, capsys, shakespeare, content, fragment):
    data = tmp_path / "data"
    write_shakespeare_char(data, shakespeare[:20_000])
    (data / "meta.pkl").write_bytes(content)
    run = tmp_path / "run"
    assert_user_error(capsys, ["train", f"--dataset={data}", f"--out_dir={run}", *TINY], fragment)
    assert not run.exists()


def test_plain_pickle_reads_plain_data(tmp_path):
    value = {"a": [1, 2.5, "x", None, True, (3, 4)], "b": {1: b"bytes"}}
    (tmp_path / "p.pkl").write_bytes(pickle.dumps(value))
    assert read_plain_pickle(tmp_path / "p.pkl") == value
    (tmp_path / "q.pkl").write_bytes(pickle.dumps(Path("x")))
    with pytest.raises(UserError, match="PosixPath"):
        read_plain_pickle(tmp_path / "q.pkl")


def test_nanogpt_char_tokenizer():
    tok = NanoGPTCharTokenizer("\n abc")
    assert tok.encode("a b\n") == [2, 1, 3, 0] and tok.eot_id == 5 and tok.vocab_size == 6
    assert tok.decode([2, 5, 4]) == "a<|endoftext|>c"
    for unknown in ("error", "replace"):  # no <|unk|> id: an unknown character is never encodable
        with pytest.raises(UserError, match="not in the char tokenizer's vocabulary: 'z'"):
            tok.encode("az", unknown=unknown)
    again = tokenizer_from_dict(tok.to_dict())
    assert isinstance(again, NanoGPTCharTokenizer) and again.fingerprint() == tok.fingerprint()
    with pytest.raises(ValueError, match="every character once"):
        NanoGPTCharTokenizer("abca")
