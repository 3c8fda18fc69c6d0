"""The Python API: smallgpt.prepare / train / load, and a Model's generate, stream, score and chat,
checked against the CLI verbs they share their code with; the README's example runs as written."""

import dataclasses
import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import smallgpt as run_cli

import smallgpt
from smallgpt import decode
from smallgpt.chat.repl import ChatArgs
from smallgpt.cli import main
from smallgpt.data.prepare import load_meta
from smallgpt.errors import UserError
from smallgpt.evaluate import EvalArgs, run_eval
from smallgpt.generate import ContinueArgs
from smallgpt.model.quantize import Int8Linear

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(block_size=32, n_layer=2, n_head=2, n_embd=32, batch_size=4, eval_iters=2, learning_rate=3e-3)
QUIET = dict(progress=False, device="cpu", warmup_iters=0)
QA = [("你好", "你好呀"), ("吃了吗", "吃过了"), ("再见", "拜拜")]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("api")
    data = smallgpt.prepare(shared_data / "tinyshakespeare" / "input.txt", out=root / "data")
    run = smallgpt.train(
        dataset=str(data), out_dir=str(root / "run"), max_iters=30, eval_interval=30, **TINY, **QUIET
    )
    return run


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny chat model that learned three exchanges by heart, alone and after another one
    (greedy replies are predictable, with history too)."""
    root = tmp_path_factory.mktemp("api_chat")
    singles = [f"{q}\n{a}" for q, a in QA * 30]
    pairs = [f"{q}\n{a}\n{q2}\n{a2}" for q, a in QA for q2, a2 in QA if q != q2] * 5
    (root / "qa.txt").write_text("\n\n".join(singles + pairs), encoding="utf-8")
    data = smallgpt.prepare(root / "qa.txt", out=root / "data", format="chat", block_size=32)
    settings = {**TINY, **QUIET, "n_layer": 1, "batch_size": 8, "learning_rate": 1e-2}
    run = smallgpt.train(
        dataset=str(data), out_dir=str(root / "run"), max_iters=150, loss_on="bot", **settings
    )
    return smallgpt.load(run, device="cpu")


def test_prepare_and_train_return_their_folders(text_run):
    assert text_run.name == "run" and (text_run / "ckpt" / "best" / "model.safetensors").is_file()
    assert (text_run.parent / "data" / "meta.json").is_file()
    config = (text_run / "config.yaml").read_text()
    assert "n_embd: 32" in config and "max_iters: 30" in config  # the keyword overrides, typed


def test_generate_is_the_sample_verb(text_run):
    m = smallgpt.load(text_run, device="cpu")
    text = m.generate("ROMEO:", max_new_tokens=40, seed=7)
    assert 0 < len(text) <= 40  # a char model: one character per token
    assert m.generate("ROMEO:", max_new_tokens=40, seed=7) == text  # a seed fixes the text
    flags = [
        "--start",
        "ROMEO:",
        "--num-samples",
        "1",
        "--seed",
        "7",
        "--max-new-tokens",
        "40",
        "--device",
        "cpu",
    ]
    sample = run_cli("sample", "--run", str(text_run), *flags)
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout == f"ROMEO:{text}\n---------------\n"  # same defaults, same path, same text
    pieces = list(m.stream("ROMEO:", max_new_tokens=40, seed=7))
    assert len(pieces) > 1 and "".join(pieces) == text


def test_precision_and_compile_options_are_the_sample_flags(text_run, monkeypatch):
    """load(dtype, quantize, compile) gives sample's model and engine: the same greedy text as the
    CLI with --quantize int8 --compile (torch.compile's aot_eager backend here, no C++ build)."""
    monkeypatch.setattr(decode, "COMPILE_BACKEND", "aot_eager")
    m = smallgpt.load(text_run, device="cpu", quantize="int8", compile=True)
    assert isinstance(m.model.lm_head, Int8Linear)
    text = m.generate("ROMEO:", max_new_tokens=20, temperature=0)
    plain = smallgpt.load(text_run, device="cpu", quantize="int8").generate(
        "ROMEO:", max_new_tokens=20, temperature=0
    )
    assert text == plain and len(text) == 20


def test_score_is_the_eval_verb(text_run, tmp_path):
    m = smallgpt.load(text_run, device="cpu")
    text = "First Citizen:\nWe are accounted poor citizens, the patricians good.\n"
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    [result] = run_eval(
        EvalArgs(run=[str(text_run)], input=[str(tmp_path / "in.txt")], stride=8, device="cpu")
    )
    score = m.score(text, stride=8)
    assert score["tokens"] == len(text) == result.score.tokens
    assert score["loss"] == result.score.loss and score["bits_per_byte"] == result.score.bits_per_byte
    with pytest.raises(UserError, match="stride"):
        m.score(text, stride=33)
    with pytest.raises(UserError, match="no text"):
        m.score("")


def test_a_hugging_face_folder_loads_and_scores_like_its_run(text_run, tmp_path, capsys):
    assert main(["export", "--run", str(text_run), "--out", str(tmp_path / "hf")]) == 0
    text = "MENENIUS:\nWhat work's, my countrymen, in hand?"
    from_run = smallgpt.load(text_run, device="cpu").score(text)
    from_folder = smallgpt.load(tmp_path / "hf", device="cpu").score(text)  # config.json: init_from
    assert from_folder == pytest.approx(from_run, rel=1e-5)
    capsys.readouterr()
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    eval_args = ["--init-from", str(tmp_path / "hf"), "--input", str(tmp_path / "in.txt"), "--device", "cpu"]
    assert main(["eval", "--run", str(text_run), *eval_args]) == 0
    run_row, folder_row = capsys.readouterr().out.splitlines()[1:3]
    assert run_row.split()[3:] == folder_row.split()[3:]  # same figures in the table


def test_chat_answers_messages_in_the_chat_format(chat_model):
    assert chat_model.chat([{"role": "user", "content": "吃了吗"}], temperature=0) == "吃过了"
    messages = [
        {"role": "system", "content": "be brief"},  # a run without <|system|>: ignored, with a warning
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好呀"},
        {"role": "user", "content": "再见"},
    ]
    with pytest.warns(UserWarning, match="trained without system messages"):
        assert chat_model.chat(messages, temperature=0) == "拜拜"
    parts = [{"type": "text", "text": "吃了"}, {"type": "text", "text": "吗"}]  # as the server takes them
    assert chat_model.chat([{"role": "user", "content": parts}], temperature=0) == "吃过了"
    sampled = chat_model.chat(messages[1:], seed=3)
    assert chat_model.chat(messages[1:], seed=3) == sampled


UNSEEN_NOTE = "2 character(s) the model never saw are read as <|unk|>: ' ', 'o'"


def test_unseen_characters_are_read_as_unk_with_one_warning(chat_model, text_run):
    """Chat, generate and score read characters the model never saw as <|unk|> (as smallgpt chat
    and the server do), say so once, at the caller's line, and score counts them."""
    with pytest.warns(UserWarning) as caught:
        reply = chat_model.chat(
            [
                {"role": "user", "content": "吃 o"},
                {"role": "assistant", "content": "o"},
                {"role": "user", "content": "吃了吗"},
            ],
            temperature=0,
        )
    assert [str(w.message) for w in caught] == [UNSEEN_NOTE] and caught[0].filename == __file__
    assert isinstance(reply, str)
    m = smallgpt.load(text_run, device="cpu")
    with pytest.warns(UserWarning, match="1 character\\(s\\) .*: '你'") as caught:
        text = m.generate("ROMEO: 你", max_new_tokens=5, seed=1)
    assert len(caught) == 1 and caught[0].filename == __file__ and len(text) <= 5
    assert m.score("ROMEO: 你好")["unknown_chars"] == 2 and m.score("ROMEO")["unknown_chars"] == 0


def test_a_system_message_reaches_the_models_context(system_chat_run, generation_prompts):
    from smallgpt.chat.format import BOT, SYSTEM, USER, ChatFormat, Turn

    m = smallgpt.load(system_chat_run, device="cpu")
    messages = [{"role": "system", "content": "你是猫"}, {"role": "user", "content": "你好"}]
    m.chat(messages, max_new_tokens=4, seed=1)
    fmt = ChatFormat(m.tokenizer)
    assert fmt.decode(generation_prompts[0]) == [Turn(SYSTEM, "你是猫"), Turn(USER, "你好"), Turn(BOT, "")]


def test_chat_replies_like_the_chat_verb(chat_model, capsys):
    reply = chat_model.chat([{"role": "user", "content": "你好"}], seed=5, temperature=1.5)
    flags = ["--message", "你好", "--seed", "5", "--temperature", "1.5", "--device", "cpu"]
    assert main(["chat", "--run", chat_model.name, *flags]) == 0
    assert capsys.readouterr().out == reply + "\n"


@pytest.mark.parametrize(
    "messages, fragment",
    [
        ([], "last message"),
        ([{"role": "assistant", "content": "hi"}], "last message"),
        ([{"role": "robot", "content": "hi"}], "message 0"),
        ([{"role": "user", "content": 3}], "message 0"),
        (["hi"], "message 0"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "message 0: content"),
    ],
)
def test_bad_messages_are_user_errors(chat_model, messages, fragment):
    with pytest.raises(UserError, match=fragment):
        chat_model.chat(messages)


def test_chat_needs_a_chat_run(text_run):
    with pytest.raises(UserError, match="no chat tokens"):
        smallgpt.load(text_run, device="cpu").chat([{"role": "user", "content": "hi"}])


def test_prepare_and_train_replace_only_with_overwrite(text_run, tmp_path, shared_data, folder_hashes):
    text = shared_data / "tinyshakespeare" / "input.txt"
    before = folder_hashes(text_run.parent)
    with pytest.raises(UserError, match="already holds a trained run"):
        smallgpt.train(
            dataset=str(text_run.parent / "data"), out_dir=str(text_run), max_iters=1, **TINY, **QUIET
        )
    with pytest.raises(UserError, match="already holds prepared data"):
        smallgpt.prepare(text, out=text_run.parent / "data")
    assert folder_hashes(text_run.parent) == before
    shutil.copytree(text_run.parent / "data", tmp_path / "data")
    (tmp_path / "small.txt").write_text("To be, or not to be.\n" * 50, encoding="utf-8")
    smallgpt.prepare(tmp_path / "small.txt", out=tmp_path / "data", overwrite=True)
    assert load_meta(tmp_path / "data")["inputs"][0]["path"] == str(tmp_path / "small.txt")


def test_bad_calls_are_user_errors(text_run, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        smallgpt.load(tmp_path / "nope")
    with pytest.raises(UserError, match="temperature"):
        smallgpt.load(text_run, device="cpu").generate("x", temperature=-1)
    with pytest.raises(UserError, match="max_new_tokens must be an integer, got '5'"):  # was a TypeError
        smallgpt.load(text_run, device="cpu").generate("A", max_new_tokens="5")
    with pytest.raises(UserError, match="seed"):
        smallgpt.load(text_run, device="cpu").generate("A", seed="1")
    with pytest.raises(UserError, match="n_layer"):
        smallgpt.train(dataset="x", n_layers=2)  # the closest key is named
    with pytest.raises(UserError, match="tokenizr"):
        smallgpt.prepare(tmp_path / "in.txt", out=tmp_path / "data", tokenizr="gpt2")


def test_sampling_defaults_are_the_cli_verbs():
    def defaults(function):
        params = inspect.signature(function).parameters.values()
        return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name != "seed"}

    def cli_defaults(args_class, names):
        return {f.name: f.default for f in dataclasses.fields(args_class) if f.name in names}

    stream = defaults(smallgpt.Model.stream)
    assert stream == cli_defaults(ContinueArgs, stream) == defaults(smallgpt.Model.generate)
    chat = defaults(smallgpt.Model.chat)
    assert chat == cli_defaults(ChatArgs, chat)


def readme_python_example() -> str:
    """The first ```python block under the README's "Python API" heading."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Python API\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs(tmp_path, shared_data):
    shutil.copy(shared_data / "tinyshakespeare" / "input.txt", tmp_path / "input.txt")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", readme_python_example()], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "'bits_per_byte':" in done.stdout
    assert (tmp_path / "runs").is_dir()  # it trained a run where it was run
