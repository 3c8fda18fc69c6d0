import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from smallgpt.chat.corpora import detect_format, join_spaced, read_dialogues
from smallgpt.chat.format import (
    BOT,
    CHAT_TOKENS,
    END_TOKEN,
    NO_SYSTEM_TURN,
    SYSTEM,
    SYSTEM_TOKEN,
    USER,
    ChatFormat,
    Turn,
    alternate,
    keep_recent,
    turns_from_messages,
    windows,
)
from smallgpt.chat.repl import ChatSession
from smallgpt.cli import main
from smallgpt.config import load_config
from smallgpt.data.tokenizers import build_tokenizer, load_tokenizer, tokenizer_from_dict
from smallgpt.errors import UserError
from smallgpt.generate import Generator
from smallgpt.preparation import PrepareArgs, run_prepare
from smallgpt.serve.models import ServedModel
from smallgpt.train.run import train

CONVERSATION = [
    Turn(USER, "你好！今天天气怎么样？"),
    Turn(BOT, "挺好的，出去走走吧。"),
    Turn(USER, "I typed <|bot|> and <|end|> here"),
    Turn(BOT, "哈哈 ok"),
]
QA = [("你好", "你好呀"), ("吃了吗", "吃过了"), ("再见", "拜拜")]


def chat_tokenizer(kind: str, system: bool = False):
    tok = build_tokenizer(kind, [t.text for t in CONVERSATION] * 20)
    tok.add_special_tokens(CHAT_TOKENS + ((SYSTEM_TOKEN,) if system else ()))
    return tok


@pytest.mark.parametrize("kind", ["char", "gpt2", "bpe:300"])
def test_round_trip_and_saved_tokenizer(kind):
    tok = chat_tokenizer(kind)
    fmt = ChatFormat(tok)
    ids, _ = fmt.encode(CONVERSATION)
    assert fmt.decode(ids) == CONVERSATION
    # typed markers stay text: the only marker ids are the four turns' own
    assert sum(i in fmt.stop_ids for i in ids) == 2 * len(CONVERSATION)
    again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again.fingerprint() == tok.fingerprint() and again.special_tokens == tok.special_tokens
    assert again.decode(ids.tolist()) == tok.decode(ids.tolist())


def test_loss_mask_covers_exactly_the_bot_replies_and_their_end():
    tok = chat_tokenizer("char")
    fmt = ChatFormat(tok)
    ids, mask = fmt.encode(CONVERSATION)
    # runs of consecutive masked ids
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask, [0]))))
    runs = [ids[a:b].tolist() for a, b in zip(edges[::2], edges[1::2], strict=True)]
    end = tok.special_tokens[END_TOKEN]
    expected = [t.text for t in CONVERSATION if t.role == BOT]
    assert [tok.decode(r[:-1]) for r in runs] == expected
    assert all(r[-1] == end for r in runs)
    assert mask.sum() == sum(len(text) + 1 for text in expected)


def test_windows_keep_whole_turns_and_the_message_a_reply_answers():
    lengths = [5, 6, 4, 7, 3, 3]
    roles = [USER, BOT] * 3
    spans = windows(lengths, roles, max_tokens=12)
    assert spans == [(0, 2), (2, 4), (4, 6)]
    assert all(sum(lengths[a:b]) <= 12 for a, b in spans)
    # the 2nd window would start at a bot turn: it takes the user turn before it along
    assert windows([4, 4, 6], [USER, USER, BOT], max_tokens=10) == [(0, 2), (1, 3)]
    assert windows([20, 3], [USER, BOT], max_tokens=10) == [(0, 1), (1, 2)]


def test_keep_recent_trims_oldest_turns():
    assert keep_recent([5, 5, 5], 15) == 0
    assert keep_recent([5, 5, 5], 14) == 1
    assert keep_recent([5, 5, 9], 8) == 3


class ScriptedGenerator(Generator):
    """A generate.Generator that loads nothing: records prompts, answers with fixed ids."""

    def __init__(self, tok, replies, block_size=40, max_new_tokens=10):
        self.tokenizer, self.replies, self.prompts = tok, list(replies), []
        self.model = SimpleNamespace(config=SimpleNamespace(block_size=block_size))
        self.options = SimpleNamespace(max_new_tokens=max_new_tokens)

    def stream(self, ids, stop_ids):
        self.prompts.append(list(ids))
        yield from self.replies.pop(0)


def test_session_stops_at_end_of_turn_and_trims_history(capsys):
    tok = chat_tokenizer("char")
    end = tok.special_tokens[END_TOKEN]
    hao = tok.encode("挺好的")
    gen = ScriptedGenerator(tok, [[*hao, end, *tok.encode("走")], tok.encode("哈哈")] + [hao] * 3)
    session = ChatSession(gen, print)
    out = _Out()
    assert session.reply("你好", out) == "挺好的"  # nothing after <|end|>
    assert out.text == "挺好的\n"
    fmt = session.format
    assert fmt.decode(gen.prompts[0]) == [Turn(USER, "你好"), Turn(BOT, "")]  # the reply to come
    assert gen.prompts[0][0] == tok.eot_id and gen.prompts[0][-1] == fmt.marker[BOT]
    # max_new_tokens without an end: the reply is kept as a whole turn
    assert session.reply("今天天气怎么样？", out) == "哈哈"
    for text in ("出去走走吧。", "你好！你好！", "天气"):
        session.reply(text, out)
    assert len(gen.prompts[-1]) <= 40 - 10  # the context less the reply
    seen = fmt.decode(gen.prompts[-1])
    assert seen[-2:] == [Turn(USER, "天气"), Turn(BOT, "")]
    assert seen[0] == Turn(USER, "你好！你好！")  # trimmed to whole turns, starting with the user's
    assert "no longer sees" in session.history()


def test_session_notices_unseen_characters_and_long_messages():
    tok = chat_tokenizer("char")
    notes = []
    session = ChatSession(ScriptedGenerator(tok, [tok.encode("好")]), notes.append)
    assert session.reply("你好😀", _Out()) == "好"
    assert notes[0] == "1 character(s) the model never saw are read as <|unk|>: '😀'"
    assert session.reply("你" * 100, _Out()) is None and "shorten" in notes[1]
    assert [turn for turn, _ in session.turns] == [Turn(USER, "你好😀"), Turn(BOT, "好")]  # not the long one


def test_cli_session_and_server_build_the_same_prompt():
    """One context rule: the system turn, then the most recent whole turns that fit next to the
    reply, starting with a user turn. smallgpt chat's session and the server's chat route (the API
    shares the server's path) give the same ids for the same conversation."""
    tok = chat_tokenizer("char", system=True)
    replies = [tok.encode(text) for text in ("挺好的", "哈哈", "好", "走")]
    gen = ScriptedGenerator(tok, replies, block_size=40, max_new_tokens=10)
    session = ChatSession(gen, print, system="你好")
    for text in ("今天天气怎么样？", "出去走走吧。", "你好！你好！", "天气"):
        session.reply(text, _Out())
    conversation = [Turn(SYSTEM, "你好"), *(turn for turn, _ in session.turns[:-1])]
    config = SimpleNamespace(block_size=40)
    served = ServedModel("chat", SimpleNamespace(config=config), tok, None, 10, 0)  # type: ignore[arg-type]
    prompt, warnings = served.chat_prompt(conversation, 10)
    assert prompt == gen.prompts[-1] and warnings == []
    seen = session.format.decode(prompt)
    assert seen[0] == Turn(SYSTEM, "你好") and seen[1].role == USER  # kept first; the dialogue is trimmed
    assert seen[1:] == [Turn(USER, "你好！你好！"), Turn(BOT, "好"), Turn(USER, "天气"), Turn(BOT, "")]
    assert len(prompt) <= 40 - 10


def test_a_run_without_system_turns_ignores_the_system_message_with_a_note():
    tok = chat_tokenizer("char")  # as every chat run made before <|system|>
    notes = []
    gen = ScriptedGenerator(tok, [tok.encode("好")])
    session = ChatSession(gen, notes.append, system="你好")
    assert session.reply("你好", _Out()) == "好"
    assert notes == [NO_SYSTEM_TURN]
    assert session.format.decode(gen.prompts[0]) == [Turn(USER, "你好"), Turn(BOT, "")]


@pytest.mark.parametrize(
    "messages, turns",
    [
        (
            [{"role": "user", "content": [{"type": "text", "text": "你"}, {"type": "text", "text": "好"}]}],
            [Turn(USER, "你好")],
        ),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "system", "content": "s1"},
                {"role": "assistant", "content": "b"},
                {"role": "developer", "content": "s2"},
                {"role": "user", "content": "c"},
            ],
            [Turn(SYSTEM, "s1\ns2"), Turn(USER, "a"), Turn(BOT, "b"), Turn(USER, "c")],
        ),
    ],
)
def test_messages_become_turns_with_the_system_turn_first(messages, turns):
    assert turns_from_messages(messages) == turns


class _Out:
    def __init__(self):
        self.text = ""

    def write(self, s):
        self.text += s

    def flush(self):
        pass


# ---- readers ------------------------------------------------------------------------------------


def test_join_spaced():
    assert join_spaced("打 c a l l ， 2 4 岁 ！") == "打call，24岁！"
    assert join_spaced("I love you 你 好") == "I love you你好"
    assert join_spaced("C - P O P 我") == "C-POP我"


def test_readers_of_the_four_formats(tmp_path):
    files = {
        "a.json": json.dumps([["你 好", "你 好 呀"], ["在 吗", "在", "好 的"]], ensure_ascii=False),
        "b.txt": "你 好\t你 好 呀\n\n在 吗\t在\n",
        "c.txt": "你好\n你好呀\n\n\n在吗\n在\n",
        "d.jsonl": json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "be nice"},
                    {"role": "user", "content": "你好"},
                    {"role": "assistant", "content": "你好呀"},
                ]
            },
            ensure_ascii=False,
        )
        + "\n\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    assert [detect_format(tmp_path / n) for n in files] == ["lccc-json", "lccc-txt", "lines", "jsonl"]
    hello = alternate(["你好", "你好呀"])
    for name in files:
        dialogues = list(read_dialogues([tmp_path / name]))
        assert dialogues[0] == (hello if name != "d.jsonl" else [Turn(SYSTEM, "be nice"), *hello]), name
    assert list(read_dialogues([tmp_path / "a.json"]))[1] == alternate(["在吗", "在", "好的"])
    assert len(list(read_dialogues([tmp_path / "c.txt"]))) == 2
    (tmp_path / "e.jsonl").write_text('{"messages": [{"role": "robot", "content": "x"}]}\n')
    with pytest.raises(UserError, match=r"e.jsonl line 1: unknown role 'robot'"):
        list(read_dialogues([tmp_path / "e.jsonl"]))


def test_reads_the_shared_lccc_toy_files(shared_data):
    folder = shared_data / "chitchat_lccc"
    first = next(read_dialogues([folder / "toy_train.txt"]))
    assert first == alternate(
        [
            "为什么听一面之辞就相信？只有当事人才能知道吧，咱们旁观者并不知道真相啊",
            "因为另一个当事人不站出来啊…站出来就能比较了。",
        ]
    )
    lines = (folder / "toy_valid.txt").read_text(encoding="utf-8").splitlines()
    assert sum(1 for _ in read_dialogues([folder / "toy_valid.txt"])) == len(lines)
    from_json = list(read_dialogues([folder / "toy_data.json"]))
    assert len(from_json) == 1400 and from_json[0][0] == Turn(USER, "遭淋安逸了？")
    assert all(" " not in t.text for d in from_json[:200] for t in d)


# ---- prepare, train, chat -----------------------------------------------------------------------


def test_prepare_chat_writes_aligned_masks_and_windows(tmp_path):
    long_dialogue = {"messages": [{"role": r, "content": "字" * 9} for r in ["user", "assistant"] * 4]}
    lines = [long_dialogue] + [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA * 4
    ]
    src = tmp_path / "chat.jsonl"
    src.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines), encoding="utf-8")
    out = tmp_path / "data"
    meta = run_prepare(PrepareArgs(input=str(src), out=str(out), block_size=24, val_fraction=0.2))
    assert meta["chat"]["windows"] == 4 + 12  # the long dialogue: 4 windows of one exchange (2 x 11)
    tok = load_tokenizer(out)
    fmt = ChatFormat(tok)
    dialogues = 0
    for split in ("train", "val"):
        ids = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])
        mask = np.fromfile(out / f"{split}.mask.bin", dtype=np.uint8)
        assert len(ids) == len(mask)
        for window in np.split(ids, np.flatnonzero(ids == tok.eot_id) + 1)[:-1]:
            assert len(window) <= 25
            turns = fmt.decode(window)
            assert turns[0].role == USER
            dialogues += 1
        bot_tokens = sum(len(fmt.encode_text(t.text)) + 1 for t in fmt.decode(ids) if t.role == BOT)
        assert mask.sum() == bot_tokens
        assert not mask[ids == tok.eot_id].any()
    assert dialogues == 16


def test_prepare_keeps_system_turns_first_in_every_window_with_loss_mask_0(tmp_path):
    system = {"role": "system", "content": "简短"}
    long_dialogue = [system] + [{"role": r, "content": "字" * 6} for r in ["user", "assistant"] * 3]
    lines = [{"messages": long_dialogue}] + [
        {"messages": [system, {"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in QA
    ]
    src = tmp_path / "chat.jsonl"
    src.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines), encoding="utf-8")
    meta = run_prepare(PrepareArgs(input=str(src), out=str(tmp_path / "data"), block_size=24, val_fraction=0))
    tok = load_tokenizer(tmp_path / "data")
    assert SYSTEM_TOKEN in tok.special_tokens
    fmt = ChatFormat(tok)
    ids = np.fromfile(tmp_path / "data" / "train.bin", dtype=meta["dtype"])
    mask = np.fromfile(tmp_path / "data" / "train.mask.bin", dtype=np.uint8)
    starts = np.concatenate(([0], np.flatnonzero(ids == tok.eot_id)[:-1] + 1))
    windows_seen = [fmt.decode(ids[a:b]) for a, b in zip(starts, np.flatnonzero(ids == tok.eot_id))]
    # the long dialogue (6 + 8 + 8 x 3 tokens) is cut into windows of one exchange, each after the system turn
    assert meta["chat"]["windows"] == 3 + 3
    assert all(w[0] == Turn(SYSTEM, "简短") and w[1].role == USER for w in windows_seen)
    system_id = tok.special_tokens[SYSTEM_TOKEN]
    at_system = np.flatnonzero(ids == system_id)
    assert len(at_system) == 6 and not mask[at_system[:, None] + np.arange(4)].any()  # <|system|>简短<|end|>
    assert mask.sum() == sum(len(t.text) + 1 for w in windows_seen for t in w if t.role == BOT)


@pytest.mark.parametrize(
    "messages, error",
    [
        (
            [{"role": "user", "content": "你好"}, {"role": "robot", "content": "x"}],
            "unknown role 'robot' (user, assistant or system)",
        ),
        (
            [{"role": "system", "content": "s"}, {"role": "assistant", "content": "你好"}],
            "the first message (after system ones) is the assistant's: start with the user's",
        ),
    ],
)
def test_prepare_refuses_a_bad_messages_file_and_writes_nothing(tmp_path, capsys, messages, error):
    good = {"messages": [{"role": "user", "content": q} for q, _ in QA]}
    src = tmp_path / "chat.jsonl"
    src.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in (good, {"messages": messages})))
    assert main(["prepare", "--input", str(src), "--out", str(tmp_path / "data")]) == 2
    assert capsys.readouterr().err == f"error: {src} line 2: {error}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl"]


def test_chat_system_flag_puts_the_system_turn_first(system_chat_run, generation_prompts, capsys):
    flags = ["--max-new-tokens", "4", "--device", "cpu"]
    assert (
        main(["chat", "--run", str(system_chat_run), "--system", "你是猫", "--message", "你好", *flags]) == 0
    )
    fmt = ChatFormat(load_tokenizer(system_chat_run))
    assert fmt.decode(generation_prompts[0]) == [Turn(SYSTEM, "你是猫"), Turn(USER, "你好"), Turn(BOT, "")]
    assert capsys.readouterr().err == ""


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A tiny model that learned three exchanges by heart (greedy replies are predictable)."""
    root = tmp_path_factory.mktemp("chat")
    (root / "qa.txt").write_text("\n\n".join(f"{q}\n{a}" for q, a in QA * 30), encoding="utf-8")
    run_prepare(PrepareArgs(input=str(root / "qa.txt"), format="chat", out=str(root / "data"), block_size=32))
    overrides = ["--block_size=32", "--n_layer=1", "--n_head=2", "--n_embd=32", "--batch_size=8"]
    overrides += ["--eval_iters=2", "--eval_interval=150", "--max_iters=150", "--learning_rate=1e-2"]
    overrides += ["--loss_on=bot", "--progress=false", "--device=cpu"]
    config = load_config(None, [f"--dataset={root / 'data'}", f"--out_dir={root / 'run'}", *overrides])
    metrics = train(config)
    assert metrics["val_loss"] < 0.5  # the bot turns are learned
    return root / "run"


def smallgpt(*args, stdin=""):
    return subprocess.run(
        [sys.executable, "-m", "smallgpt", *args], input=stdin, capture_output=True, text=True, timeout=120
    )


def test_chat_cli_scripted_session(chat_run):
    greedy = ["--run", str(chat_run), "--temperature", "0", "--max-new-tokens", "12"]
    done = smallgpt("chat", *greedy, "--message", "吃了吗")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "吃过了\n"
    script = "你好\n/history\n/reset\n/history\n/bogus\n再见\n/quit\n吃了吗\n"
    done = smallgpt("chat", *greedy, stdin=script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "你好呀",
        "user: 你好",
        "bot: 你好呀",
        "(conversation forgotten)",
        "(no conversation yet)",
        "unknown command /bogus; commands: /reset forgets the conversation, /history shows it, /quit ends",
        "拜拜",
    ]
    unseen = smallgpt("chat", *greedy, "--message", "你好 x")
    assert unseen.returncode == 0 and unseen.stdout.endswith("\n")
    # a space is shown as one, not as nothing
    assert unseen.stderr == "note: 2 character(s) the model never saw are read as <|unk|>: ' ', 'x'\n"


def test_chat_cli_errors(chat_run, tmp_path):
    done = smallgpt("chat", "--run", str(chat_run), "--max-new-tokens", "40", "--message", "hi")
    assert done.returncode == 2
    assert done.stderr.startswith("error: a reply of up to 40 tokens leaves no room for the conversation")


def test_loss_on_picks_the_mask(chat_run, tmp_path):
    from smallgpt.train.distributed import init_distributed
    from smallgpt.train.run import samplers

    def train_sampler(data, loss_on):
        config = load_config(None, [f"--dataset={data}", "--block_size=16", f"--loss_on={loss_on}"])
        meta = json.loads((data / "meta.json").read_text())
        return samplers(config, data, meta, init_distributed("cpu"))[0]

    chat_data = chat_run.parent / "data"
    assert train_sampler(chat_data, "all").mask is None  # the mask file is ignored
    assert train_sampler(chat_data, "bot").next_batch()[2].any()
    (tmp_path / "plain.txt").write_text("just some text, no dialogue at all. " * 20)
    run_prepare(PrepareArgs(input=str(tmp_path / "plain.txt"), out=str(tmp_path / "text")))
    with pytest.raises(UserError, match=r"loss_on=bot needs .*train.mask.bin"):
        train_sampler(tmp_path / "text", "bot")


def test_chat_windows_must_fit_the_models_context(tmp_path):
    """Chat data cut into windows of 128 tokens cannot train a 64-token model (it would see replies
    without their message): a one-line error. Windows of 64 in a 128-token context are fine."""
    (tmp_path / "qa.txt").write_text("\n\n".join(f"{q}\n{a}" for q, a in QA * 100), encoding="utf-8")
    tiny = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--batch_size=2", "--eval_iters=1", "--max_iters=1"]
    tiny += ["--progress=false", "--device=cpu"]
    for block in (64, 128):
        out = str(tmp_path / f"data{block}")
        assert (
            main(
                [
                    "prepare",
                    "--input",
                    str(tmp_path / "qa.txt"),
                    "--format",
                    "chat",
                    "--block-size",
                    str(block),
                    "--out",
                    out,
                ]
            )
            == 0
        )
    done = smallgpt(
        "train", f"--dataset={tmp_path / 'data128'}", f"--out_dir={tmp_path / 'a'}", "--block_size=64", *tiny
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"error: {tmp_path / 'data128'} holds chat windows of up to 128 tokens, longer than block_size 64: "
        "prepare it with --block-size 64 or train with block_size=128"
    ]
    assert (
        main(
            [
                "train",
                f"--dataset={tmp_path / 'data64'}",
                f"--out_dir={tmp_path / 'b'}",
                "--block_size=128",
                *tiny,
            ]
        )
        == 0
    )
    assert (tmp_path / "b" / "ckpt" / "last" / "model.safetensors").is_file()
