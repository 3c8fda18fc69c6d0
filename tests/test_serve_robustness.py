"""Hostile and malformed requests to `smallgpt serve`: each gets OpenAI's error object with a 4xx,
never a 500; a client that leaves mid-stream frees its slots; requests in flight are undisturbed."""

import json
import random
import socket
import threading
import time
from urllib.parse import urlsplit

from test_serve import client, health, send, stream_text

from smallgpt.serve import ServeArgs


def bad_requests(lm: str, chat: str) -> list[tuple[str, str, bytes, int]]:
    """(method, path, body, expected status): at least 200 of them, the same on every run."""
    rng = random.Random(17)
    good = {"model": lm, "prompt": "ROMEO:", "max_tokens": 5}
    encoded = json.dumps(good).encode()
    cases = [("POST", "/v1/completions", rng.randbytes(rng.randint(1, 400)), 400) for _ in range(70)]
    cases += [("POST", "/v1/completions", encoded[:cut], 400) for cut in range(0, len(encoded) - 1, 1)]
    for body in (b"[]", b"1", b'"text"', b"null", b"true", b"{}", b"[" * 100_000, b"\xff\xfe{", b""):
        cases.append(("POST", "/v1/completions", body, 400))
    wrong = {
        "model": [1, None, [], True],
        "prompt": [1, None, {}, [1.5], [[]], [True], [], [10**9], ["ok", 3]],
        "max_tokens": ["10", 1.5, True, [], 0, -1, 10**6, ServeArgs().max_tokens_limit + 1],
        "temperature": ["hot", -0.1, -1, True, []],
        "top_p": [0, 1.5, -1, "1", True],
        "top_k": [0, -5, 1.5, "5"],
        "repetition_penalty": [0, -1, "1"],
        "seed": [-1, 2**63, 1.5, "1"],
        "stream": ["yes", 1],
        "n": [0, 9, -1, "2", 1.5],
        "stop": [1, [1], ["a"] * 5, [""], ""],
        "logprobs": [1, True],
        "echo": [True],
        "suffix": ["x"],
        "stream_options": ["x"],
    }
    for field, values in wrong.items():
        cases += [("POST", "/v1/completions", json.dumps(good | {field: v}).encode(), 400) for v in values]
    for special in (b"NaN", b"Infinity", b"-Infinity"):  # Python's json reads these; they are no numbers
        cases.append(("POST", "/v1/completions", encoded[:-1] + b', "temperature": ' + special + b"}", 400))
    cases += [
        ("POST", "/v1/completions", json.dumps(good | {"model": "nope"}).encode(), 404),
        ("POST", "/v1/completions", encoded[:-1] + b', "user": "\\ud800"}', 400),  # a lone surrogate
        ("POST", "/v1/completions", b'{"model": "' + lm.encode() + b'", "prompt": "\\udfff"}', 400),
        ("POST", "/v1/completions", json.dumps(good | {"prompt": ["a"] * 9}).encode(), 400),
        ("POST", "/v1/completions", json.dumps(good | {"prompt": ["a", "b"], "n": 5}).encode(), 400),
        ("POST", "/v1/completions", b"{" + b'"x": 1, ' * 200_000 + b"}", 413),  # over 1 MiB
        ("GET", "/v1/completions", b"", 405),
        ("PUT", "/v1/chat/completions", b"{}", 405),
        ("GET", "/v1/nothing", b"", 404),
        ("GET", "/v1/models/nope", b"", 404),
        ("GET", "/static/../../etc/passwd", b"", 404),
    ]
    chat_good = {"model": chat, "messages": [{"role": "user", "content": "你好"}], "max_tokens": 5}
    bad_messages = [
        [],
        [{"role": "robot", "content": "x"}],
        [{"role": "user"}],
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
        [{"role": "system", "content": "only a system message"}],
        [{"role": "user", "content": "你" * 500}],  # no room next to the reply
        "hello",
    ]
    cases += [
        ("POST", "/v1/chat/completions", json.dumps(chat_good | {"messages": m}).encode(), 400)
        for m in bad_messages
    ]
    cases += [
        ("POST", "/v1/chat/completions", json.dumps(chat_good | {"model": lm}).encode(), 400),  # no chat run
        (
            "POST",
            "/v1/chat/completions",
            json.dumps(chat_good | {"tools": [{"type": "function"}]}).encode(),
            400,
        ),
        ("POST", "/v1/chat/completions", json.dumps(chat_good | {"max_completion_tokens": 64}).encode(), 400),
        ("POST", "/v1/chat/completions", json.dumps({"model": chat}).encode(), 400),
    ]
    return cases


def check_error(response, expected: int, case) -> None:
    body = response.read()
    assert response.status == expected, (case[:2], case[2][:200], response.status, body[:300])
    error = json.loads(body)["error"]
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and set(error) == {"message", "type", "param", "code"}, error


def raw_socket(server) -> socket.socket:
    host, port = urlsplit(server.base_url).netloc.split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def test_hostile_requests_get_4xx_error_objects_and_never_disturb_others(server, lm_run, lccc_chat_run):
    greedy = {"model": lm_run.name, "prompt": "ROMEO:", "max_tokens": 200, "temperature": 0}
    expected = client(server).completions.create(**greedy).choices[0].text
    in_flight: list[tuple[str, str]] = []
    neighbour = threading.Thread(target=lambda: in_flight.append(stream_text(server, **greedy)))
    neighbour.start()

    cases = bad_requests(lm_run.name, lccc_chat_run.name)
    assert len(cases) >= 200
    deadline = time.monotonic() + 120
    for case in cases:
        assert time.monotonic() < deadline, "the hostile requests took too long"
        method, path, body, status = case
        check_error(send(server, method, path, body), status, case)

    # a body that never arrives in full, and one without a length (chunked) that is far too long
    with raw_socket(server) as s:
        s.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"model"')
    chunked = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"x" * 65536
    with raw_socket(server) as s:
        s.sendall(chunked + (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 20 + b"0\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 413")

    neighbour.join(timeout=120)
    assert in_flight == [(expected, "length")]  # undisturbed by everything above
    assert client(server).completions.create(**greedy).choices[0].text == expected


def test_prompt_longer_than_the_context_keeps_its_end_and_says_so(server, lm_run):
    long_prompt = "To be, or not to be, that is the question. " * 20
    done = client(server).completions.create(
        model=lm_run.name, prompt=long_prompt, max_tokens=56, temperature=0
    )
    assert done.usage.prompt_tokens == 256  # the model's context (a char model: one token a character)
    assert "only its last 256 were used" in done.model_extra["warnings"][0]
    tail = client(server).completions.create(
        model=lm_run.name, prompt=long_prompt[-256:], max_tokens=56, temperature=0
    )
    assert tail.choices[0].text == done.choices[0].text and "warnings" not in tail.model_extra


def test_a_client_that_leaves_mid_stream_frees_its_slots_at_once(server, lm_run):
    before = health(server)["models"][lm_run.name]
    request = {"model": lm_run.name, "prompt": "ROMEO:", "max_tokens": 255, "n": 8, "stream": True}
    body = json.dumps(request).encode()
    with raw_socket(server) as s:
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        s.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        received = b""
        while b"data: " not in received:  # until streaming has begun
            received += s.recv(4096)
    deadline = time.monotonic() + 10
    while (now := health(server)["models"][lm_run.name])["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert now["running"] == now["waiting"] == 0
    made = now["tokens"] - before["tokens"]
    assert made < 8 * 255 / 2, made  # the 8 choices stopped early rather than running to the end
