"""The HTTP face of `smallgpt serve`: OpenAI's API shape, server-sent events, the web page.

Every bad request gets OpenAI's error object `{"error": {"message", "type", "param", "code"}}` with a
4xx status: bodies are parsed and checked here (not by FastAPI's 422 machinery) so that each mistake
names its parameter. A 500 means a bug in smallgpt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from smallgpt.chat.format import default_reply_tokens, turns_from_messages
from smallgpt.data.tokenizers import Unseen
from smallgpt.decode import MAX_SEED, SamplingSettings, SettingError
from smallgpt.errors import UserError
from smallgpt.serve.engine import QueueFull
from smallgpt.serve.models import Completion, ServedModel

STATIC = Path(__file__).parent / "static"
MAX_BODY = 1 << 20  # bytes: far more than any prompt a block_size of context can use
MAX_CHOICES = 8  # n, and prompts x n, per request
MAX_STOP = 4  # stop texts, as OpenAI allows
PARAMS = {"max_new_tokens": "max_tokens"}  # a sampling setting's name -> the request field's
log = logging.getLogger("smallgpt.serve")


class ApiError(Exception):
    """A request the server refuses: becomes OpenAI's error object with this status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind, self.headers = kind, headers


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---- request bodies: types are strict (a string is not a number); values are checked in `sampling`


class Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # not OpenAI's: pass it in the client's extra_body
    repetition_penalty: float | None = None  # idem
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    logprobs: Any = None  # not supported: refused when set
    user: str | None = None


class CompletionBody(Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None  # not supported
    suffix: str | None = None  # not supported
    best_of: int | None = None  # not supported


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


class ChatBody(Body):
    messages: list[Message]
    max_completion_tokens: int | None = None  # the newer name of max_tokens
    tools: Any = None  # not supported


async def read_body(request: Request, schema: type[BaseModel]) -> Any:
    """The JSON body, checked against `schema`; ApiError (413, 400) for any problem."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY:
        raise ApiError(413, f"the request body is over {MAX_BODY} bytes", code="body_too_large")
    raw = b""
    try:
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY:
                raise ApiError(413, f"the request body is over {MAX_BODY} bytes", code="body_too_large")
    except ClientDisconnect:  # nobody is left to answer; end the request quietly
        raise ApiError(400, "the client went away before sending the whole body") from None
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        body = schema.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(part) for part in first["loc"] if not str(part).startswith(("str", "list")))
        raise ApiError(400, f"{param or 'body'}: {first['msg']}", param=param or None) from None
    check_strings(data)
    return body


def check_strings(value: Any, path: str = "") -> None:
    """JSON may carry lone surrogates (\\ud800), which are not text any tokenizer can encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, f"{path or 'body'} is not valid Unicode text", param=path or None) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_strings(key, path)
            check_strings(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_strings(item, f"{path}.{i}")


def sampling(
    body: Body, served: ServedModel, max_tokens: int | None, default_max: int
) -> tuple[SamplingSettings, list[str]]:
    """The request's sampling settings, checked by SamplingSettings.validate as every front-end's
    are, and its stop texts; the limits only HTTP has (max_tokens, stop, n) are checked here."""
    max_tokens = default_max if max_tokens is None else max_tokens
    limit = served.max_tokens_limit
    if not 1 <= max_tokens <= limit:
        message = f"max_tokens must be between 1 and {limit} (the server's limit), got {max_tokens}"
        raise ApiError(400, message, "max_tokens")
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    if len(stop) > MAX_STOP or any(not s for s in stop):
        raise ApiError(400, f"stop takes at most {MAX_STOP} non-empty texts", "stop")
    if not 1 <= body.n <= MAX_CHOICES:
        raise ApiError(400, f"n must be between 1 and {MAX_CHOICES}, got {body.n}", "n")
    for name in ("logprobs", "echo", "suffix", "tools"):
        if getattr(body, name, None) not in (None, False, 0):
            raise ApiError(400, f"{name} is not supported by smallgpt serve", name)
    settings = SamplingSettings(
        max_new_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        seed=secrets.randbelow(MAX_SEED) if body.seed is None else body.seed,
    )
    try:
        settings.validate()
    except SettingError as e:
        raise ApiError(400, str(e), PARAMS.get(e.name, e.name)) from None
    return settings, stop


def completion_prompts(body: CompletionBody, served: ServedModel, warnings: list[str]) -> list[list[int]]:
    """The prompt(s) as token ids: a text, texts, token ids, or lists of token ids; characters the
    model never saw are read as <|unk|> and named once in `warnings`."""
    prompt = body.prompt
    if not prompt and not isinstance(prompt, str):
        raise ApiError(400, "prompt is an empty list", "prompt")
    if isinstance(prompt, str) or isinstance(prompt[0], str):
        texts = [prompt] if isinstance(prompt, str) else prompt
        with param_errors("prompt"):
            encoded = [served.encode(text) for text in texts]
        warnings += [note] if (note := sum((u for _, u in encoded), Unseen()).note()) else []
        return [ids for ids, _ in encoded]
    prompts = [prompt] if isinstance(prompt[0], int) else prompt
    vocab = served.model.config.vocab_size
    for ids in prompts:
        if not ids or not all(0 <= i < vocab for i in ids):
            raise ApiError(400, f"token id prompts must be non-empty, with ids in [0, {vocab})", "prompt")
    return [list(ids) for ids in prompts]


@contextlib.contextmanager
def param_errors(param: str) -> Iterator[None]:
    """A UserError (e.g. a character the tokenizer never saw) as a 400 naming `param`."""
    try:
        yield
    except UserError as e:
        raise ApiError(400, str(e), param) from None


# ---- responses


class Job:
    """The completions of one request (prompts x n choices), already queued."""

    def __init__(self, served: ServedModel, chat: bool):
        self.served, self.chat = served, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.choices: list[Completion] = []
        self.prompt_tokens = 0
        self.warnings: list[str] = []

    def submit(self, prompts: list[list[int]], settings: SamplingSettings, stop: list[str], n: int) -> None:
        """Queue n choices per prompt; choice i samples with seed + i, so the choices differ."""
        if len(prompts) * n > MAX_CHOICES:
            raise ApiError(400, f"prompts x n must be at most {MAX_CHOICES}", "n")
        try:
            for ids in prompts:
                ids, note = self.served.fit_prompt(ids)
                self.warnings += [note] if note else []
                self.prompt_tokens += len(ids)
                for i in range(n):
                    seeded = dataclasses.replace(settings, seed=((settings.seed or 0) + i) % MAX_SEED)
                    self.choices.append(self.served.complete(ids, seeded, stop, chat=self.chat))
        except QueueFull:
            self.cancel()
            raise ApiError(
                503,
                f"model {self.served.name!r} is busy: too many requests are waiting; retry shortly",
                code="queue_full",
                kind="server_error",
                headers={"Retry-After": "1"},
            ) from None
        except BaseException:
            self.cancel()
            raise

    def cancel(self) -> None:
        for choice in self.choices:
            choice.cancel()

    def usage(self) -> dict[str, int]:
        completion = sum(c.completion_tokens for c in self.choices)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    def head(self, kind: str) -> dict[str, Any]:
        """The fields every response or chunk starts with; `warnings` only in the first of them."""
        head: dict[str, Any] = {"id": self.id, "object": kind, "created": self.created}
        head["model"] = self.served.name
        if self.warnings:
            head["warnings"], self.warnings = self.warnings, []
        return head

    def choice(self, index: int, text: str | None, finish: str | None, first: bool = False) -> dict:
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text is not None else {})
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}

    async def whole(self) -> dict:
        """The finished response, for a request without `stream`."""
        texts = [await choice.text() for choice in self.choices]
        if self.chat:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": c.finish_reason,
                }
                for i, (text, c) in enumerate(zip(texts, self.choices))
            ]
            return self.head("chat.completion") | {"choices": choices, "usage": self.usage()}
        choices = [
            self.choice(i, text, c.finish_reason) for i, (text, c) in enumerate(zip(texts, self.choices))
        ]
        return self.head("text_completion") | {"choices": choices, "usage": self.usage()}

    async def chunks(self, include_usage: bool) -> AsyncIterator[dict]:
        """OpenAI's stream chunks: text as it comes, then each choice's finish_reason."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        for i, choice in enumerate(self.choices):
            if self.chat:
                yield self.head(kind) | {"choices": [self.choice(i, "", None, first=True)]}
            async for text in choice.pieces():
                yield self.head(kind) | {"choices": [self.choice(i, text, None)]}
            yield self.head(kind) | {"choices": [self.choice(i, None, choice.finish_reason)]}
        if include_usage:
            yield self.head(kind) | {"choices": [], "usage": self.usage()}


async def event_stream(chunks: AsyncIterator[dict], cancel: Callable[[], None]) -> AsyncIterator[str]:
    """Server-sent events, one per chunk, then `data: [DONE]`.

    Chunks are made on the event loop as the engine's reader thread hands over its steps. A client that
    goes away cancels the job (Starlette cancels this generator), so its batch slots are freed at
    once.
    """
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"
    except Exception:
        log.exception("a stream failed")  # a bug: tell the client in the stream, keep serving others
        yield f"data: {json.dumps(error_body('internal error while generating', 'server_error'))}\n\n"
    finally:
        cancel()


async def respond(job: Job, body: Body) -> Response:
    if not body.stream:
        try:
            return JSONResponse(await job.whole())
        finally:
            job.cancel()
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    return StreamingResponse(
        event_stream(job.chunks(include_usage), job.cancel),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


# ---- the app


def create_app(models: dict[str, ServedModel], api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="smallgpt", docs_url=None, redoc_url=None, openapi_url=None)

    def find(name: str) -> ServedModel:
        if name not in models:
            known = ", ".join(models)
            raise ApiError(404, f"model {name!r} does not exist; served: {known}", "model", "model_not_found")
        return models[name]

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(
                401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key"
            )

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.kind, e.param, e.code), e.status, headers=e.headers)

    @app.exception_handler(UserError)
    async def user_error(request: Request, e: UserError) -> JSONResponse:
        return JSONResponse(error_body(str(e), "invalid_request_error"), 400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(str(e.detail), "invalid_request_error"), e.status_code, headers=e.headers
        )

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception) -> JSONResponse:
        log.exception("internal error")
        return JSONResponse(error_body("internal error", "server_error"), 500)

    @app.get("/")
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": {name: m.stats() for name, m in models.items()}}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        authorize(request)
        return {"object": "list", "data": [m.describe() for m in models.values()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request) -> dict:
        authorize(request)
        return find(name).describe()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        body = await read_body(request, CompletionBody)
        served = find(body.model)
        settings, stop = sampling(body, served, body.max_tokens, default_max=min(16, served.max_tokens_limit))
        job = Job(served, chat=False)
        job.submit(completion_prompts(body, served, job.warnings), settings, stop, body.n)
        return await respond(job, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        body = await read_body(request, ChatBody)
        served = find(body.model)
        if served.chat is None:
            raise ApiError(
                400,
                f"model {served.name!r} was not trained on chat data: use /v1/completions",
                "model",
                "not_a_chat_model",
            )
        default_max = default_reply_tokens(served.block_size)
        settings, stop = sampling(body, served, body.max_completion_tokens or body.max_tokens, default_max)
        job = Job(served, chat=True)
        with param_errors("messages"):
            conversation = turns_from_messages([m.model_dump() for m in body.messages])
            prompt, job.warnings = served.chat_prompt(conversation, settings.max_new_tokens)
        job.submit([prompt], settings, stop, body.n)
        return await respond(job, body)

    return app
