"""GGUF export, checked in a real llama.cpp (the `xllamacpp` wheel's llama-server, on 127.0.0.1): the
same prompt ids, the same greedy tokens and the same next-token log-probs as smallgpt, for a char
run (gpt2 architecture), a GPT-2 BPE run (llama architecture), a bpe:N run and a chat run."""

import json
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import torch
import xllamacpp  # llama.cpp's CPU wheel, in the dev extra: a missing one fails here, never skips
from conftest import TINY_TRAINING

from smallgpt import cli
from smallgpt.chat.format import ChatFormat, turns_from_messages
from smallgpt.data.tokenizers import UNK, CharTokenizer, NanoGPTCharTokenizer, Tokenizer
from smallgpt.export import ExportArgs, chat_template, export
from smallgpt.model import gguf
from smallgpt.model.gpt import GPT, ModelConfig
from smallgpt.preparation import PrepareArgs, run_prepare
from smallgpt.runs import load_run

STEPS = 32  # greedy tokens compared
TOP = 8  # log-probs compared per step: llama.cpp's most likely ids
# How close llama.cpp's next-token log-probs must be to smallgpt's, by dtype and architecture.
# Measured on these four runs, f32: 1.1e-5 on the llama architecture (float32 sums in another
# order); 3e-4 to 1.8e-3 on gpt2's, where llama.cpp computes GELU in its tanh form through a float16
# table (smallgpt's default is exact GELU; in tanh form smallgpt moves by up to 5e-4) and runs its
# own LayerNorm and GELU kernels. f16 rounds each weight to 11 significant bits (relative 2.4e-4): up
# to 1.6e-3. Each bound is 5-10x the largest seen; llama's f32 bound is tight enough to see q and k
# rows left in smallgpt's rotary order (5.6e-4 on the tiny llama run). q8_0 (up to 2.6e-2) is held
# to its greedy top-1 instead.
TOLERANCE = {("f32", "llama"): 1e-4, ("f32", "gpt2"): 1e-2, ("f16", "llama"): 1e-2, ("f16", "gpt2"): 1e-2}
Q8_AGREEMENT = 0.9  # q8_0: greedy steps whose top-1 is smallgpt's (measured: 32 of 32 on every run)


class LlamaCpp:
    """llama.cpp's server on one GGUF file, one thread, answering on 127.0.0.1."""

    def __init__(self, path: Path, n_ctx: int):
        params = xllamacpp.CommonParams()
        params.model.path = str(path)
        params.n_ctx = n_ctx
        params.cpuparams.n_threads = 1
        params.cpuparams_batch.n_threads = 1
        params.warmup = False
        params.cache_type_k = params.cache_type_v = xllamacpp.ggml_type.GGML_TYPE_F32
        params.use_jinja = True  # chat templates run as Jinja, as ollama and llama-server --jinja do
        self.server = xllamacpp.Server(params)

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(
            self.server.listening_address + path,
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        return self.post("/tokenize", {"content": text, "parse_special": special})["tokens"]

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        """n greedy tokens, never an end-of-generation one (so that a chat model writes on)."""
        body = {"prompt": prompt, "n_predict": n, "temperature": 0, "return_tokens": True, "ignore_eos": True}
        return self.post("/completion", body)["tokens"]

    def next_log_probs(self, ids: list[int]) -> dict[int, float] | None:
        """The log-probs of the TOP most likely next ids; None where the most likely one is part of a
        character (llama-server sends no log-probs for a token that is not whole UTF-8 text)."""
        body = {"prompt": ids, "n_predict": 1, "temperature": 0, "n_probs": TOP, "cache_prompt": False}
        steps = self.post("/completion", body).get("completion_probabilities")
        return {t["id"]: t["logprob"] for t in steps[0]["top_logprobs"]} if steps else None


@contextmanager
def llama_cpp(path: Path, n_ctx: int):
    server = LlamaCpp(path, n_ctx)
    try:
        yield server
    finally:
        del server.server  # stops it


def log_probs(model: GPT, ids: list[int]) -> torch.Tensor:
    """smallgpt's next-token log-probs after each prefix of ids (T, vocab)."""
    with torch.no_grad():
        return torch.log_softmax(model.lm_head(model.hidden_states(torch.tensor([ids]))), -1)[0]


def greedy(model: GPT, prompt: list[int], n: int, ends: set[int], stop: bool = True) -> list[int]:
    """n greedy tokens of smallgpt; the first of `ends` stops it, or (stop=False) is never chosen."""
    ids = list(prompt)
    for _ in range(n):
        scores = log_probs(model, ids)[-1]
        if not stop:
            scores[list(ends)] = float("-inf")
        ids.append(int(scores.argmax()))
        if ids[-1] in ends:
            break
    return ids[len(prompt) :]


def end_ids(tokenizer: Tokenizer) -> set[int]:
    """The ids llama.cpp ends generation at: <|endoftext|>, and a chat run's <|end|>."""
    chat = chat_template(tokenizer)
    return {tokenizer.eot_id} | ({chat[1]} if chat else set())


def parity(run: Path, tmp_path: Path, text: str, prompt: list[int] | None = None) -> dict[str, float]:
    """Export `run` in each dtype and compare it in llama.cpp with smallgpt: the ids of `text`, and
    from `prompt` (default: those ids) the greedy tokens and next-token log-probs. Returns the largest
    log-prob difference per dtype and the share of q8_0's greedy steps whose top-1 is ours."""
    model, tokenizer = load_run(run, torch.device("cpu"))
    ids = tokenizer.encode(text, unknown="replace")
    prompt = prompt or ids
    assert len(prompt) + STEPS <= model.config.block_size
    found = {}
    for dtype in gguf.DTYPES:
        out = tmp_path / f"model-{dtype}.gguf"
        export(ExportArgs(run=str(run), out=str(out), format="gguf", dtype=dtype))
        with llama_cpp(out, model.config.block_size) as theirs:
            assert theirs.tokenize(text) == ids, text
            generated = theirs.greedy(prompt, STEPS)
            path = prompt + generated
            tops = [theirs.next_log_probs(path[: len(prompt) + i]) for i in range(len(generated))]
        ours = log_probs(model, path)[len(prompt) - 1 :]
        if dtype == "f32":
            assert generated == greedy(model, prompt, STEPS, end_ids(tokenizer), stop=False)
        compared = [(top, row) for top, row in zip(tops, ours) if top is not None]
        assert len(compared) >= len(generated) / 2
        found[dtype] = max(abs(lp - float(row[i])) for top, row in compared for i, lp in top.items())
        if dtype == "q8_0":
            choosable = ours.index_fill(1, torch.tensor(sorted(end_ids(tokenizer))), float("-inf"))
            agree = sum(token == int(row.argmax()) for token, row in zip(generated, choosable))
            assert agree >= Q8_AGREEMENT * len(generated), (
                f"q8_0 top-1 is ours on {agree} of {len(generated)}"
            )
            found["q8_0 top-1"] = agree / len(generated)
        else:
            arch = "llama" if model.config.pos_emb == "rope" else "gpt2"
            assert found[dtype] < TOLERANCE[dtype, arch], f"{dtype}: log-probs differ by {found[dtype]}"
    print(run.name, len(generated), found)
    return found


# ---- the four runs ---------------------------------------------------------------------------------


def prepare_and_train(root: Path, shared_data: Path, tokenizer: str, *options: str) -> Path:
    """A slice of tiny shakespeare prepared with `tokenizer`, and a tiny model trained on it 30 steps."""
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:40_000]
    (root / "input.txt").write_text(text, encoding="utf-8")
    run_prepare(PrepareArgs(input=str(root / "input.txt"), tokenizer=tokenizer, out=str(root / "data")))
    args = [f"--dataset={root / 'data'}", f"--out_dir={root / 'run'}", "--block_size=128", "--max_iters=30"]
    assert cli.main(["train", *args, "--eval_interval=30", *TINY_TRAINING, *options]) == 0
    return root / "run"


ENGLISH = "First Citizen:\nBefore we  proceed any further, hear me speak.\n\nAll:\nSpeak, speak."


def test_char_run_as_gpt2_architecture(lm_run, tmp_path):
    # spaces, newlines and an unseen character (<|unk|> in both)
    parity(lm_run, tmp_path, ENGLISH + " caf\u00e9 \u4e2d")


def test_gpt2_tokenizer_run_as_llama_architecture(tmp_path, shared_data):
    llama = ["--norm=rmsnorm", "--mlp=swiglu", "--pos_emb=rope", "--bias=false", "--vocab_size=50304"]
    run = prepare_and_train(tmp_path, shared_data, "gpt2", *llama)
    parity(run, tmp_path, ENGLISH + " Ünïcödé, 中文 and emoji 🙂\n\n  tabs\tand 1234")


def test_bpe_run_without_biases(tmp_path, shared_data):
    run = prepare_and_train(tmp_path, shared_data, "bpe:400", "--bias=false")
    parity(run, tmp_path, ENGLISH + " 中文 🙂\n\n  tabs\t1234")


def served_prompt(run: Path, messages: list[dict]) -> list[int]:
    """The prompt smallgpt's server gives a chat run for `messages`."""
    model, tokenizer = load_run(run, torch.device("cpu"))
    turns = turns_from_messages(messages)
    return ChatFormat(tokenizer).conversation_prompt(turns, model.config.block_size, reply=16)[0]


def test_chat_run_formats_turns_as_trained(lccc_chat_run, tmp_path, shared_data):
    model, tokenizer = load_run(lccc_chat_run, torch.device("cpu"))
    first = (shared_data / "chitchat_lccc" / "toy_valid.txt").read_text(encoding="utf-8").splitlines()[0]
    said = [u.replace(" ", "") for u in first.split("\t")]  # the chat data's utterances, characters seen
    messages = [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": said[1]},
        {"role": "user", "content": "吃了吗？"},
    ]
    served = served_prompt(lccc_chat_run, messages)
    out = tmp_path / "chat.gguf"
    export(ExportArgs(run=str(lccc_chat_run), out=str(out), format="gguf"))
    with llama_cpp(out, model.config.block_size) as theirs:
        prompt = theirs.post("/apply-template", {"messages": messages})["prompt"]
        assert theirs.tokenize(prompt, special=True) == served
        reply = theirs.server.handle_chat_completions(
            {"messages": messages, "temperature": 0, "max_tokens": 16}
        )
    ours = greedy(model, served, 16, end_ids(tokenizer))
    assert ours[-1] == tokenizer.special_tokens["<|end|>"] and len(ours) > 1  # a reply, not an empty one
    assert reply["choices"][0]["message"]["content"] == tokenizer.decode(ours[:-1])
    # Chinese text with an unseen character (<|unk|> in both) between seen ones
    parity(lccc_chat_run, tmp_path, said[0][:12] + "\u00e9" + said[1][:12])


def test_system_messages_become_the_first_turn_as_in_smallgpt(system_chat_run, tmp_path):
    messages = [
        {"role": "system", "content": "猫"},
        {"role": "user", "content": "你好呀"},
        {"role": "assistant", "content": "你好"},
        {"role": "system", "content": "狗"},  # joined to the first: the format has one system turn
        {"role": "user", "content": "吃了吗"},
    ]
    out = tmp_path / "system.gguf"
    export(ExportArgs(run=str(system_chat_run), out=str(out), format="gguf"))
    with llama_cpp(out, 48) as theirs:
        prompt = theirs.post("/apply-template", {"messages": messages})["prompt"]
        assert theirs.tokenize(prompt, special=True) == served_prompt(system_chat_run, messages)


# ---- what the file holds, and what is refused ------------------------------------------------------


def test_rope_rows_interleave_each_heads_halves():
    rows = torch.arange(8.0)[:, None]  # 2 heads of size 4: (x1 x2 y1 y2) each
    assert gguf.interleave_rope_rows(rows, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_char_vocabulary_spells_space_as_sentencepiece_does(tmp_path, make_run):
    import gguf as gguf_package

    tokenizer = CharTokenizer("ab \n")
    tokenizer.add_special_tokens(["<|user|>"])
    config = ModelConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=32)
    make_run(tmp_path / "run", config, tokenizer)
    export(ExportArgs(run=str(tmp_path / "run"), out=str(tmp_path / "m.gguf"), format="gguf"))
    fields = gguf_package.GGUFReader(tmp_path / "m.gguf").fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert tokens[:7] == ["<|endoftext|>", UNK, "\n", gguf.SPACE, "a", "b", "<|user|>"]
    assert tokens[7:] == [f"[PAD{i}]" for i in range(9)]  # the vocab rows beyond the tokenizer's
    assert fields["tokenizer.ggml.model"].contents() == "t5"
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is False  # no leading space added
    assert fields["gpt2.context_length"].contents() == 8
    assert "tokenizer.chat_template" not in fields  # <|user|> alone is no chat format


def test_nanogpt_vocabulary_keeps_its_ids_and_reads_unseen_characters_as_end_of_text(tmp_path, make_run):
    tokenizer = NanoGPTCharTokenizer("\n !abc")  # nanoGPT's ids, no <|unk|>
    make_run(
        tmp_path / "run", ModelConfig(block_size=16, vocab_size=7, n_layer=1, n_head=1, n_embd=32), tokenizer
    )
    export(ExportArgs(run=str(tmp_path / "run"), out=str(tmp_path / "m.gguf"), format="gguf"))
    with llama_cpp(tmp_path / "m.gguf", 16) as theirs:
        assert theirs.tokenize("ab c!\n") == tokenizer.encode("ab c!\n")
        assert theirs.tokenize("ab\u00e9") == [3, 4, tokenizer.eot_id]  # smallgpt refuses this text
