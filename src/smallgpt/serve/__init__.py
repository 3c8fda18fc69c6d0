"""`smallgpt serve`: runs behind an OpenAI-shaped HTTP API and a web page, decoded in shared batches.

The web parts (FastAPI, uvicorn) are the optional extra `smallgpt[serve]`, imported only here when
the server starts. See docs/serve.md.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field

from smallgpt.errors import UserError
from smallgpt.runs import Precision


@dataclass
class ServeArgs(Precision):
    run: list[str] = field(
        default_factory=list,
        metadata={"help": "a run folder to serve, named by its folder name (repeat for several runs)"},
    )
    init_from: str = field(
        default="", metadata={"help": "also serve gpt2, ..., gpt2-xl or a transformers folder"}
    )
    host: str = field(
        default="127.0.0.1", metadata={"help": "address to listen on (default: this machine only)"}
    )
    port: int = field(default=8000, metadata={"help": "port to listen on"})
    api_key: str | None = field(
        default=None, metadata={"help": "require `Authorization: Bearer KEY` on /v1 requests"}
    )
    max_batch: int = field(default=8, metadata={"help": "requests decoded together per model"})
    max_queue: int = field(
        default=64, metadata={"help": "requests waiting for a batch slot before new ones get 503"}
    )
    max_tokens_limit: int = field(
        default=4096,
        metadata={
            "help": "the most tokens one completion may ask for (max_tokens); past the model's "
            "context the window slides, as in `smallgpt sample`"
        },
    )
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N | mps"})
    checkpoint: str = field(default="best", metadata={"help": "which checkpoint of each run: best | last"})
    compile: bool = field(
        default=False,
        metadata={"help": "torch.compile each model's decoding step (~10 s at start, faster tokens)"},
    )

    def validate(self) -> None:
        if not 0 <= self.port < 65536:
            raise UserError(f"port must be in 0..65535, got {self.port}")
        if self.max_batch < 1 or self.max_queue < 1 or self.max_tokens_limit < 1:
            raise UserError("max-batch, max-queue and max-tokens-limit must be 1 or more")


def serve(args: ServeArgs) -> None:
    """Load the runs, then serve them until Ctrl-C."""
    args.validate()
    try:
        import uvicorn

        from smallgpt.serve.app import create_app
    except ImportError as e:
        raise UserError(
            f"smallgpt serve needs FastAPI and uvicorn ({e.name} is missing): pip install 'smallgpt[serve]'"
        ) from None
    from smallgpt.device import resolve_device
    from smallgpt.serve.models import load_models

    check_can_listen(args.host, args.port)
    device = resolve_device(args.device)
    models = load_models(
        args.run,
        args.init_from,
        args.checkpoint,
        device,
        args.max_batch,
        args.max_queue,
        args,
        args.compile,
        max_tokens_limit=args.max_tokens_limit,
    )
    app = create_app(models, args.api_key)
    base = f"http://{args.host if ':' not in args.host else f'[{args.host}]'}:{args.port}"
    print(f"serving {', '.join(models)} on {device}")
    print(f"page: {base}/")
    print(f"API:  {base}/v1  (OpenAI-compatible)", flush=True)
    if args.api_key is None and not is_loopback(args.host):
        print(f"warning: {args.host} is reachable from other machines and no --api-key is set", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=2)
    finally:
        for served in models.values():
            served.scheduler.stop()


def check_can_listen(host: str, port: int) -> None:
    """UserError now, before loading any model, when the address is taken or not this machine's."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is fine
            probe.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
