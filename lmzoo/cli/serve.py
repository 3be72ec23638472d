"""Serve a model directory over an OpenAI-compatible HTTP API, many clients batched together.

Endpoints: POST /v1/chat/completions and /v1/completions (streamed with "stream": true), GET /v1/models,
/health, /metrics (JSON: requests, tokens/s, queue, cache blocks) and / (a web page, when installed).
Requests are batched continuously by lmzoo's paged-KV engine; at most --max-queue sequences wait or run at
once (each of a request's n choices counts), and the next request gets HTTP 503 until one finishes.
Chat messages go through the directory's chat template (or, without one, a built-in: a note says which),
and a turn ends at EOS or the template's end-of-turn token. The official openai client works against it:
  OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")

Examples:
  lmzoo serve --model path/to/qwen-chat
  lmzoo serve --model path/to/llama --port 8080 --max-batch 16 --api-key sk-local   # or LMZOO_API_KEY
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"messages": [{"role": "user", "content": "你好"}], "max_tokens": 32, "stream": true}'

Needs fastapi and uvicorn (pip install 'lmzoo[serve]'). Ctrl-C stops the server: requests still streaming
get up to 5 s to finish, then the engine stops.
"""

from __future__ import annotations

import errno
import os
import socket

from lmzoo.cli.common import add_memory_argument, add_revision_argument, takes_model
from lmzoo.errors import LmzooError

HELP = "serve a model directory over an OpenAI-compatible HTTP API (continuous batching, streaming)"


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="a checkpoint directory with a tokenizer, or a Hub id")
    add_revision_argument(p)
    takes_model(p, "model")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                       "only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-name", help="the model id clients use (default: the directory's name)")
    p.add_argument("--api-key", default=os.environ.get("LMZOO_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $LMZOO_API_KEY, else none)")
    p.add_argument("--max-batch", type=int, default=32, help="most sequences decoded in one step")
    p.add_argument("--max-queue", type=int, default=64, help="most sequences waiting + running; more get 503")
    p.add_argument("--max-batched-tokens", type=int, default=512, help="most prompt tokens prefilled in one step")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    p.add_argument("--num-blocks", type=int, help="KV-cache blocks (default: the engine's choice for the model)")
    p.add_argument("--template", help="chat template: a built-in name, a Jinja file or Jinja source "
                                      "(default: the directory's own)")
    p.add_argument("--dtype", help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (info logs every request)")
    add_memory_argument(p)


def _check(args) -> None:
    for flag in ("max_batch", "max_queue", "max_batched_tokens", "block_size", "num_blocks"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise LmzooError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    if not 0 <= args.port <= 65535:
        raise LmzooError(f"--port must be in [0, 65535], got {args.port}")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads, so a busy port fails at once and port 0 works."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        why = "is in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
        raise LmzooError(f"{host}:{port} {why}; choose another --port or --host") from None
    return sock


def run(args) -> int:
    from lmzoo.serve import require_server_packages

    _check(args)
    require_server_packages()
    import uvicorn

    from lmzoo.serve.app import create_app

    sock = bind(args.host, args.port)
    app = create_app(args.model, served_name=args.served_name, max_batch=args.max_batch, max_queue=args.max_queue,
                     api_key=args.api_key, block_size=args.block_size, num_blocks=args.num_blocks,
                     max_batched_tokens=args.max_batched_tokens, dtype=args.dtype, device=args.device,
                     template=args.template, skip_memory_check=args.skip_memory_check)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    name = app.state.served.name
    print(f"lmzoo serve: '{name}' at http://{shown}:{port} (OpenAI API at http://{shown}:{port}/v1"
          f"{', API key required' if args.api_key else ''}); Ctrl-C stops", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
    return 0
