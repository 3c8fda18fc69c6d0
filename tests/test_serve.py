"""`smallgpt serve` through the official `openai` client: the same text as `sample`/`chat`, streaming,
usage, batching of concurrent requests, the API key and the full queue."""

import asyncio
import http.client
import io
import json
import socket
import threading
from urllib.parse import urlsplit

import openai
import pytest

from smallgpt.chat.format import BOT, NO_SYSTEM_TURN, SYSTEM, USER, ChatFormat, Turn
from smallgpt.cli import main
from smallgpt.data.tokenizers import load_tokenizer
from smallgpt.decode import SamplingSettings
from smallgpt.runs import find_checkpoint
from smallgpt.serve.models import split_at_stop

SEPARATOR = "\n---------------\n"
PROMPTS = ["ROMEO:", "JULIET:\nO", "First Citizen:", "KING", "What is", "The ", "And yet", "HAMLET"]


def client(server, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=api_key, max_retries=0)


def sampled(capsys, run, start: str, new_tokens: int, *flags: str) -> str:
    """The text `smallgpt sample` prints after `start` (one sample)."""
    capsys.readouterr()
    args = ["sample", "--run", str(run), "--start", start, "--num-samples", "1"]
    assert main([*args, "--max-new-tokens", str(new_tokens), *flags]) == 0
    out = capsys.readouterr().out
    assert out.startswith(start) and out.endswith(SEPARATOR)
    return out[len(start) : -len(SEPARATOR)]


def stream_text(server, **request) -> tuple[str, str]:
    """(text, finish_reason) of a streamed completion."""
    pieces, finish = [], None
    for chunk in client(server).completions.create(stream=True, **request):
        pieces.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    return "".join(pieces), finish


def connect(server, timeout: float = 60) -> http.client.HTTPConnection:
    return http.client.HTTPConnection(urlsplit(server.base_url).netloc, timeout=timeout)


def send(server, method: str, path: str, body=None, headers=None) -> http.client.HTTPResponse:
    """A raw request (bytes, or JSON for anything else); the response is open for reading."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn = connect(server)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    return conn.getresponse()


def health(server) -> dict:
    return json.loads(send(server, "GET", "/health").read())


def test_models_are_named_by_their_folders(server, lm_run, lccc_chat_run):
    models = {m.id: m for m in client(server).models.list()}
    assert set(models) == {lm_run.name, lccc_chat_run.name}
    assert models[lccc_chat_run.name].model_extra["chat"] is True
    assert models[lm_run.name].model_extra["chat"] is False
    assert client(server).models.retrieve(lm_run.name).model_extra["block_size"] == 256
    # when the run's checkpoint was written (it was 0, whatever the model)
    assert models[lm_run.name].created == int(find_checkpoint(lm_run).stat().st_mtime) > 0
    assert "page: http://127.0.0.1:" in server.output() and "/v1" in server.output()


def test_greedy_completion_is_the_text_sample_prints(server, lm_run, capsys):
    expected = sampled(capsys, lm_run, "ROMEO:", 30, "--temperature", "0")
    greedy = {"model": lm_run.name, "prompt": "ROMEO:", "max_tokens": 30, "temperature": 0}
    done = client(server).completions.create(**greedy)
    assert done.choices[0].text == expected
    assert done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (6, 30, 36)
    assert stream_text(server, **greedy) == (expected, "length")


def test_a_completion_longer_than_the_context_slides_as_sample_does(server, lm_run, capsys):
    """block_size is 256: the window slides past it, as `smallgpt sample` does (it was a 400)."""
    expected = sampled(capsys, lm_run, "ROMEO:", 300, "--temperature", "0")
    greedy = {"model": lm_run.name, "prompt": "ROMEO:", "max_tokens": 300, "temperature": 0}
    done = client(server).completions.create(**greedy)
    assert done.choices[0].text == expected and len(expected) == 300  # a char model: a character a token
    assert (done.usage.completion_tokens, done.choices[0].finish_reason) == (300, "length")
    assert stream_text(server, **greedy) == (expected, "length")


def test_warnings_come_once_in_a_stream(server, lm_run):
    """The warning that a long prompt was cut is in the stream's first chunk only (it was in each)."""
    request = {"model": lm_run.name, "prompt": "ROMEO: " * 100, "max_tokens": 5, "stream": True}
    response = send(server, "POST", "/v1/completions", request)
    events = response.read().decode().split("\n\n")
    chunks = [json.loads(e[len("data: ") :]) for e in events if e.startswith("data: {")]
    assert len(chunks) == 6 and events[-2] == "data: [DONE]"  # 5 tokens, then the finish_reason
    assert "only its last 256 were used" in chunks[0]["warnings"][0]
    assert [c for c in chunks[1:] if "warnings" in c] == []


def test_the_server_never_samples_embedding_rows_past_the_tokenizer(lm_run, tmp_path):
    """A vocabulary padded past the tokenizer's (GPT-2's 50257 -> 50304) leaves rows with no text:
    the server suppresses them as `smallgpt sample` does (its own copy of the rule did not)."""
    import torch

    from smallgpt.data.tokenizers import load_tokenizer, save_tokenizer
    from smallgpt.model.gpt import GPT, ModelConfig
    from smallgpt.serve.models import load_models
    from smallgpt.train import checkpoint

    tokenizer = load_tokenizer(lm_run / "tokenizer.json")
    config = ModelConfig(block_size=16, vocab_size=tokenizer.vocab_size + 13, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    model = GPT(config).eval()
    with torch.no_grad():  # every position's hidden state is v: the padding rows' logits are the largest
        v = torch.randn(16)
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(v)
        model.lm_head.weight[tokenizer.vocab_size :] = 10 * v
        model.lm_head.weight[tokenizer.encode("a")] = 5 * v  # then this ordinary one
    tags = {"tokenizer_fingerprint": tokenizer.fingerprint()}
    run = tmp_path / "padded"
    checkpoint.write_checkpoint(run / "ckpt" / "best", checkpoint.model_weights(model), config, {}, tags)
    save_tokenizer(tokenizer, run / "tokenizer.json")
    models = load_models([str(run)], "", "best", torch.device("cpu"), 1, 1, max_tokens_limit=10)
    try:
        greedy = SamplingSettings(max_new_tokens=10, temperature=0)
        assert asyncio.run(models["padded"].complete([0], greedy).text()) == "a" * 10
    finally:
        models["padded"].scheduler.stop()


def test_seeded_sampling_is_the_text_sample_prints(server, lm_run, capsys):
    expected = sampled(capsys, lm_run, "ROMEO:", 40, "--seed", "7", "--temperature", "0.9", "--top-k", "20")
    request = {"model": lm_run.name, "prompt": "ROMEO:", "max_tokens": 40, "temperature": 0.9, "seed": 7}
    done = client(server).completions.create(**request, extra_body={"top_k": 20})
    assert done.choices[0].text == expected
    other = client(server).completions.create(**{**request, "seed": 8}, extra_body={"top_k": 20})
    assert other.choices[0].text != expected


def test_stop_texts_n_choices_and_stream_usage(server, lm_run):
    greedy = {"model": lm_run.name, "prompt": "ROMEO:", "max_tokens": 30, "temperature": 0}
    full = client(server).completions.create(**greedy).choices[0].text
    stop = full[10:12]
    cut = client(server).completions.create(**greedy, stop=[stop, "never there"])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    assert stream_text(server, **greedy, stop=stop) == (full[: full.index(stop)], "stop")
    several = client(server).completions.create(**greedy, n=3)
    assert [c.text for c in several.choices] == [full] * 3 and several.usage.completion_tokens == 90
    chunks = list(
        client(server).completions.create(**greedy, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[-1].usage.completion_tokens == 30 and chunks[-1].choices == []


def test_stop_texts_are_never_sent_in_part():
    assert split_at_stop("abc<e", ["<end>"]) == ("abc", "<e", False)
    assert split_at_stop("abc<end>x", ["<end>", "c<"]) == ("ab", "", True)
    assert split_at_stop("abc<e", ["<end>"], final=True) == ("abc<e", "", False)


def test_chat_replies_are_the_replies_chat_prints(server, lccc_chat_run, capsys, monkeypatch):
    greedy = ["--temperature", "0", "--max-new-tokens", "12", "--repetition-penalty", "1"]
    monkeypatch.setattr("sys.stdin", io.StringIO("你好\n吃了吗？\n"))
    capsys.readouterr()
    assert main(["chat", "--run", str(lccc_chat_run), *greedy]) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first  # the run learned to say something
    chat = client(server).chat.completions
    settings = {"model": lccc_chat_run.name, "temperature": 0, "max_tokens": 12}
    messages = [{"role": "system", "content": "ignored: this run has no system turn"}]
    messages.append({"role": "user", "content": "你好"})
    done = chat.create(messages=messages, **settings)
    assert done.choices[0].message.content == first and done.choices[0].message.role == "assistant"
    assert done.model_extra["warnings"] == [NO_SYSTEM_TURN]
    assert done.usage.completion_tokens <= 12 and done.usage.prompt_tokens == len("你好") + 4
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "吃了吗？"}]
    pieces = [
        c.choices[0].delta.content or "" for c in chat.create(messages=messages, stream=True, **settings)
    ]
    assert "".join(pieces) == second


UNSEEN_NOTE = "2 character(s) the model never saw are read as <|unk|>: ' ', 'o'"


def test_unseen_characters_get_a_reply_and_a_warning_as_in_smallgpt_chat(
    server, lccc_chat_run, lm_run, capsys
):
    """The LCCC char model never saw a space or an `o`: the server reads them as <|unk|>, as the
    chat verb does, answers the same (200, not 400), and names them once in `warnings`."""
    greedy = ["--temperature", "0", "--max-new-tokens", "12", "--repetition-penalty", "1"]
    capsys.readouterr()
    assert main(["chat", "--run", str(lccc_chat_run), *greedy, "--message", "你好 o"]) == 0
    out, err = capsys.readouterr()
    assert err == f"note: {UNSEEN_NOTE}\n"
    settings = {"model": lccc_chat_run.name, "temperature": 0, "max_tokens": 12}
    done = client(server).chat.completions.create(
        messages=[{"role": "user", "content": "你好 o"}], **settings
    )
    assert done.choices[0].message.content + "\n" == out
    assert done.model_extra["warnings"] == [UNSEEN_NOTE]
    expected = sampled(capsys, lm_run, "ROMEO: 你", 10, "--temperature", "0")
    greedy_text = {"model": lm_run.name, "prompt": "ROMEO: 你", "max_tokens": 10, "temperature": 0}
    text = client(server).completions.create(**greedy_text)
    assert text.choices[0].text == expected
    assert text.model_extra["warnings"] == ["1 character(s) the model never saw are read as <|unk|>: '你'"]


@pytest.fixture(scope="module")
def system_server(tmp_path_factory, system_chat_run):
    from conftest import ServerProcess

    process = ServerProcess(tmp_path_factory.mktemp("serve") / "serve.log", "--run", str(system_chat_run))
    yield process
    process.close()
    assert "Traceback" not in process.output(), process.output()


def test_a_system_message_reaches_the_models_context(system_server, system_chat_run):
    """The system turn is in the prompt the server gives the model: its tokens are counted, as
    `ChatFormat.conversation_prompt` (the one chat prompt of chat, the API and the server) builds it."""
    tokenizer = load_tokenizer(system_chat_run)
    fmt = ChatFormat(tokenizer)
    system, user = "你是猫", [{"role": "user", "content": "你好"}]
    prompt, notes = fmt.conversation_prompt([Turn(SYSTEM, system), Turn(USER, "你好")], 48, 4)
    assert fmt.decode(prompt) == [Turn(SYSTEM, system), Turn(USER, "你好"), Turn(BOT, "")] and not notes
    chat = client(system_server).chat.completions
    settings = {"model": system_chat_run.name, "max_tokens": 4, "seed": 1}
    with_system = chat.create(messages=[{"role": "system", "content": system}, *user], **settings)
    without = chat.create(messages=user, **settings)
    assert with_system.usage.prompt_tokens == len(prompt) == 1 + (2 + 3) + (2 + 2) + 1
    assert without.usage.prompt_tokens == len(prompt) - (2 + 3)
    assert "warnings" not in with_system.model_extra


def test_a_plain_run_has_no_chat_completions(server, lm_run):
    with pytest.raises(openai.BadRequestError, match="use /v1/completions"):
        client(server).chat.completions.create(
            model=lm_run.name, messages=[{"role": "user", "content": "hi"}]
        )


def test_concurrent_streams_are_decoded_together_and_each_gets_its_own_text(server, lm_run):
    greedy = {"model": lm_run.name, "max_tokens": 120, "temperature": 0}
    alone = [client(server).completions.create(**greedy, prompt=p).choices[0].text for p in PROMPTS]
    before = health(server)["models"][lm_run.name]
    results: dict[int, tuple[str, str]] = {}
    start = threading.Barrier(len(PROMPTS))

    def request(i: int) -> None:
        start.wait()
        results[i] = stream_text(server, **greedy, prompt=PROMPTS[i])

    threads = [threading.Thread(target=request, args=(i,)) for i in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [results[i][0] for i in range(len(PROMPTS))] == alone
    after = health(server)["models"][lm_run.name]
    tokens = after["tokens"] - before["tokens"]
    steps = after["steps"] - before["steps"]
    shared = {int(size): n - before["batch_sizes"].get(size, 0) for size, n in after["batch_sizes"].items()}
    assert tokens == 120 * len(PROMPTS)
    assert steps < tokens / 2, (steps, tokens, shared)  # most tokens were made in shared steps
    assert max(size for size, n in shared.items() if n > 0) >= 4, shared


def test_a_taken_port_is_a_one_line_error(lm_run, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert main(["serve", "--run", str(lm_run), "--port", port]) == 2
    assert capsys.readouterr().err.startswith(f"error: cannot listen on 127.0.0.1:{port}: ")


def test_api_key_and_full_queue(tmp_path, lm_run):
    from conftest import ServerProcess

    server = ServerProcess(
        tmp_path / "serve.log",
        "--run",
        str(lm_run),
        "--api-key",
        "sesame",
        "--max-batch",
        "1",
        "--max-queue",
        "1",
    )
    try:
        with pytest.raises(openai.AuthenticationError):
            client(server, api_key="wrong").models.list()
        assert send(server, "GET", "/v1/models").status == 401
        assert send(server, "GET", "/health").status == 200  # the page and health stay open
        assert send(server, "GET", "/").status == 200
        keyed = client(server, api_key="sesame")
        assert [m.id for m in keyed.models.list()] == [lm_run.name]
        long = {"model": lm_run.name, "prompt": "ROMEO:", "max_tokens": 255, "stream": True}
        auth = {"Authorization": "Bearer sesame"}
        running = send(server, "POST", "/v1/completions", long, auth)
        assert running.readline().startswith(b"data: ")  # running: the one batch slot is taken
        waiting = send(server, "POST", "/v1/completions", long, auth)
        assert waiting.status == 200  # queued: the queue (of 1) is full
        full = send(server, "POST", "/v1/completions", long, auth)
        assert full.status == 503 and full.headers["Retry-After"] == "1"
        assert json.loads(full.read())["error"]["code"] == "queue_full"
        assert json.loads(waiting.readline()[len("data: ") :])["choices"]  # it still runs, later
    finally:
        server.close()
    assert "Traceback" not in server.output()


def test_serve_loads_models_with_the_precision_flags(lm_run):
    import torch

    from smallgpt.model.quantize import Int8Linear
    from smallgpt.runs import Precision
    from smallgpt.serve.models import load_models

    precision = Precision(quantize="int8")
    models = load_models([str(lm_run)], "", "best", torch.device("cpu"), 2, 2, precision, max_tokens_limit=9)
    try:
        [served] = models.values()
        assert isinstance(served.model.lm_head, Int8Linear)
        greedy = SamplingSettings(max_new_tokens=5, temperature=0)
        assert len(asyncio.run(served.complete(served.encode("ROMEO:")[0], greedy).text())) == 5
    finally:
        for served in models.values():
            served.scheduler.stop()


def test_init_from_serves_a_transformers_folder_named_after_it(lm_run, tmp_path):
    import torch

    from smallgpt.export import ExportArgs, export
    from smallgpt.serve.models import load_models

    exported = export(ExportArgs(run=str(lm_run), out=str(tmp_path / "exported")))
    models = load_models([str(lm_run)], str(exported), "best", torch.device("cpu"), 2, 2, max_tokens_limit=20)
    try:
        assert list(models) == [lm_run.name, "exported"]
        assert all(isinstance(m.model.lm_head, torch.nn.Linear) for m in models.values())
        texts = [
            asyncio.run(m.complete(m.encode("ROMEO:")[0], SamplingSettings(20, temperature=0)).text())
            for m in models.values()
        ]
        assert texts[0] == texts[1] and len(texts[0]) == 20
    finally:
        for served in models.values():
            served.scheduler.stop()
