import json

import numpy as np
import pytest

from smallgpt.data.tokenizers import (
    CharTokenizer,
    NanoGPTCharTokenizer,
    Unseen,
    build_tokenizer,
    load_tokenizer,
    save_tokenizer,
    tokenizer_from_dict,
)
from smallgpt.errors import UserError

ENGLISH = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
EMOJI = "fun 😀🎉 with emoji 👍🏽 and flags 🇫🇷"
MIXED = "Mixed: 孙悟空 said «hello» — 😀 tab\tand\r\nCRLF ünïcödé"


@pytest.fixture(scope="module")
def chinese(shared_data) -> str:
    lines = (shared_data / "chinese_novel" / "xiyouji.txt").read_text(encoding="utf-8-sig")
    return "\n".join(lines.splitlines()[:40])


@pytest.fixture(scope="module")
def gpt2():
    return build_tokenizer("gpt2")


def test_char_vocabulary_layout():
    tok = build_tokenizer("char", ["ba", "c", "ab"])
    assert tok.kind == "char" and tok.vocab_size == 5 and tok.eot_id == 0
    assert tok.special_tokens == {"<|endoftext|>": 0, "<|unk|>": 1}
    assert tok.encode("abc") == [2, 3, 4]


@pytest.mark.parametrize("name", ["english", "chinese", "emoji", "mixed"])
def test_char_round_trip(name, chinese):
    text = {"english": ENGLISH, "chinese": chinese, "emoji": EMOJI, "mixed": MIXED}[name]
    tok = build_tokenizer("char", [text[:7], text[7:]])
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text


def test_char_does_not_parse_special_strings():
    tok = build_tokenizer("char", ["<|endoftext|> hi"])
    ids = tok.encode("<|endoftext|>")
    assert len(ids) == len("<|endoftext|>") and tok.eot_id not in ids
    assert tok.decode([tok.eot_id]) == "<|endoftext|>"


def test_char_unknown_characters():
    tok = build_tokenizer("char", ["abc"])
    with pytest.raises(UserError, match=r"2 character\(s\).*'x', '😀'"):
        tok.encode("abxc😀x")
    assert tok.encode("ax😀", unknown="replace") == [2, 1, 1]
    assert tok.decode(tok.encode("ax", unknown="replace")) == "a<|unk|>"


def test_user_text_reads_unseen_characters_as_unk_and_names_them_visibly():
    """The one rule of every surface (chat, the API, the server, eval): unseen characters become
    <|unk|>, counted, named once; a space or a newline is shown, not blank."""
    tok = build_tokenizer("char", ["ab"])
    ids, unseen = tok.encode_user_text("a b\nb a😀")
    assert ids.tolist() == [2, 1, 3, 1, 3, 1, 2, 1]
    assert unseen == Unseen((" ", "\n", "😀"), 4)
    assert unseen.note() == "3 character(s) the model never saw are read as <|unk|>: ' ', '\\n', '😀'"
    assert (unseen + Unseen(("😀", "x"), 2)).chars == (" ", "\n", "😀", "x")
    assert tok.encode_user_text("ab")[1].note() is None
    gpt2 = build_tokenizer("gpt2")
    ids, unseen = gpt2.encode_user_text("a b 😀")
    assert gpt2.decode(ids.tolist()) == "a b 😀" and unseen == Unseen()
    with pytest.raises(UserError, match="'x'"):  # a nanoGPT vocabulary has no <|unk|> to read it as
        NanoGPTCharTokenizer("ab").encode_user_text("ax")
    many = Unseen(tuple("cdefghijklmn"), 12).note()
    assert many is not None and many.endswith("'k', 'l' and 2 more")


def test_char_batch_matches_single(chinese):
    tok = build_tokenizer("char", [chinese, EMOJI])
    texts = [chinese[:100], "", EMOJI, chinese[100:150]]
    arrays = tok.encode_batch_to_arrays(texts)
    assert [a.tolist() for a in arrays] == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch_to_arrays([]) == []


def test_char_save_load_keeps_ids_and_fingerprint(tmp_path, chinese):
    tok = build_tokenizer("char", [chinese, MIXED])
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path)  # a folder means its tokenizer.json
    assert loaded.fingerprint() == tok.fingerprint()
    assert loaded.encode(chinese + MIXED) == tok.encode(chinese + MIXED)
    assert json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))["kind"] == "char"


def test_fingerprint_depends_on_vocabulary():
    def fingerprint(text: str) -> str:
        return build_tokenizer("char", [text]).fingerprint()

    assert fingerprint("ab") != fingerprint("abc")
    assert fingerprint("ab") == fingerprint("ba")


def test_gpt2_pinned_ids(gpt2):
    assert gpt2.kind == "gpt2" and gpt2.vocab_size == 50257 and gpt2.eot_id == 50256
    assert gpt2.special_tokens == {"<|endoftext|>": 50256}
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.decode([15496, 995, 50256]) == "Hello world<|endoftext|>"
    assert 50256 not in gpt2.encode("<|endoftext|>")


@pytest.mark.parametrize("name", ["english", "chinese", "emoji", "mixed"])
def test_gpt2_round_trip(gpt2, name, chinese):
    text = {"english": ENGLISH, "chinese": chinese, "emoji": EMOJI, "mixed": MIXED}[name]
    assert gpt2.decode(gpt2.encode(text)) == text
    assert gpt2.encode_to_array(text).tolist() == gpt2.encode(text)


def test_gpt2_batch_matches_single(gpt2, chinese):
    texts = [ENGLISH, chinese, "", EMOJI, MIXED] * 7
    assert gpt2.encode_batch(texts) == [gpt2.encode(t) for t in texts]
    arrays = gpt2.encode_batch_to_arrays(texts)
    assert all(isinstance(a, np.ndarray) for a in arrays)
    assert [a.tolist() for a in arrays] == [gpt2.encode(t) for t in texts]


def test_gpt2_save_load(tmp_path, gpt2):
    save_tokenizer(gpt2, tmp_path / "tok.json")
    loaded = load_tokenizer(tmp_path / "tok.json")
    assert loaded.kind == "gpt2" and loaded.fingerprint() == gpt2.fingerprint()
    assert tokenizer_from_dict(gpt2.to_dict()).encode("Hello world") == [15496, 995]


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        '["a list"]',
        '{"kind": "wordpiece"}',
        '{"kind": "char"}',
        '{"kind": "gpt2", "vocab_size": 3}',
        "\udc80",
    ],
)
def test_malformed_tokenizer_file(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content.encode("utf-8", "surrogateescape"))
    with pytest.raises(UserError, match=str(path)):
        load_tokenizer(path)


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "nope.json")


def test_unknown_kind_suggests():
    with pytest.raises(UserError, match="did you mean gpt2"):
        build_tokenizer("gtp2")


def test_char_tokenizer_direct_construction():
    tok = CharTokenizer("hello")
    assert tok.chars == "ehlo" and tok.decode(tok.encode("hello")) == "hello"
