"""The FastAPI application: routes, the API key, and OpenAI-shaped errors for everything that goes wrong.

Routes: ``GET /`` (the web page in ``lmzoo/serve/static/``, when there is one), ``GET /health``,
``GET /metrics`` (JSON), ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions`` and
``POST /v1/chat/completions``. With an API key, every ``/v1`` route wants ``Authorization: Bearer KEY``
(401 otherwise); the page, health and metrics stay open. No response ever carries a traceback: an
unexpected exception is a 500 whose message says to read the server's log, where the traceback goes.

``create_app`` loads a model directory and builds the engine; ``build_app`` takes them ready-made (tests,
or another engine behind the same contract).
"""

from __future__ import annotations

import hmac
import sys
import time
import traceback
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmzoo.serve.async_engine import AsyncEngine
from lmzoo.serve.completions import Generation, Served, collect_unless_gone, encode_prompts, sse
from lmzoo.serve.protocol import ApiError, parse_body, parse_chat, parse_completion
from lmzoo.generate.fastpath import fuse_for_decode
from lmzoo.generate.paged import pageable

STATIC = Path(__file__).parent / "static"


class EventStream(StreamingResponse):
    """SSE that aborts its sequences however the response ends (finished, client gone, cancelled)."""

    def __init__(self, gen: Generation, on_close):
        super().__init__(sse(gen), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.gen, self.on_close = gen, on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.gen.abort_unfinished()
            self.on_close()


def _error(e: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status == 503 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def build_app(served: Served, *, api_key: str | None = None) -> FastAPI:
    engine = served.engine
    started = time.time()
    active = {"http": 0}

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.close()

    app = FastAPI(title="lmzoo", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served = served

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(401, "a valid API key is required: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return _error(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e):
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return _error(ApiError(e.status_code, message))

    @app.exception_handler(Exception)
    async def unexpected(request, e):
        traceback.print_exception(e, file=sys.stderr)
        return _error(ApiError(500, f"internal server error ({type(e).__name__}); the server's log has the details"))

    @app.get("/", include_in_schema=False)
    async def index():
        page = STATIC / "index.html"
        if not page.is_file():
            raise ApiError(404, "this server has no web page (lmzoo/serve/static/index.html is missing); "
                           "the API is at /v1")
        return FileResponse(page)

    if STATIC.is_dir():
        from fastapi.staticfiles import StaticFiles

        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health():
        ok = engine.stats()["alive"]
        return JSONResponse({"status": "ok" if ok else "engine stopped"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        s = engine.stats()
        e = s.pop("engine")
        s.pop("alive")
        return {"model": served.name, "uptime_s": round(time.time() - started, 3), "requests_active": active["http"],
                **s, **{k: e.get(k) for k in ("running", "waiting", "blocks_used", "blocks_total", "block_size",
                                              "prefix_cache_hits")}, "engine": e}

    def model_card() -> dict:
        return {"id": served.name, "object": "model", "created": int(started), "owned_by": "lmzoo",
                "max_model_len": engine.context_length}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        check_key(request)
        if model_id != served.name:
            raise ApiError(404, f"the model '{model_id}' does not exist; this server serves '{served.name}'",
                           param="model", code="model_not_found")
        return model_card()

    async def generate(request: Request, parse):
        check_key(request)
        req = parse(parse_body(await request.body()))
        if req.model is not None and req.model != served.name:
            raise ApiError(404, f"the model '{req.model}' does not exist; this server serves '{served.name}'",
                           param="model", code="model_not_found")
        gen = Generation(served, req, encode_prompts(served, req))
        await gen.start()
        active["http"] += 1
        if req.stream:
            return EventStream(gen, on_close=lambda: active.__setitem__("http", active["http"] - 1))
        try:
            body = await collect_unless_gone(gen, _disconnected(request))
        finally:
            active["http"] -= 1
        return JSONResponse(body if body is not None else {})

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, parse_completion)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, parse_chat)

    return app


def create_app(model_dir, *, served_name: str | None = None, max_batch: int = 32, max_queue: int = 64,
               api_key: str | None = None, block_size: int = 16, num_blocks: int | None = None,
               max_batched_tokens: int = 512, dtype: str | None = None, device: str = "cpu",
               template: str | None = None, engine_cls=None, skip_memory_check: bool = False) -> FastAPI:
    """Load ``model_dir`` (its weights, tokenizer and chat template) and serve it. ``template``: as
    ``lmzoo chat --template``; without one, the directory's own, else a built-in (a note on stderr says which)."""
    import lmzoo
    from lmzoo.cli.chat import template_for
    from lmzoo.cli.common import require_decoder, resolve_model
    from lmzoo.cli.generate import _eos_ids
    from lmzoo.errors import LmzooError
    from lmzoo.tokenizers import find_tokenizer
    from lmzoo.tokenizers.chat import stop_ids

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise LmzooError(f"--model '{model_dir}' is not a directory: lmzoo serve serves a checkpoint directory "
                         "(or a Hub id's)")
    fam = require_decoder(str(model_dir), "lmzoo serve")
    if find_tokenizer(str(model_dir)) is None:
        raise LmzooError(f"'{model_dir}' has no tokenizer (tokenizer.json, tokenizer.model, vocab.json + merges.txt, "
                         "vocab.txt or *.tiktoken); the server needs one to read prompts and write text")
    tok = lmzoo.load_tokenizer(str(model_dir))
    source, _ = template_for(template, tok, str(model_dir))
    model = resolve_model(str(model_dir), dtype, device=device, skip_memory_check=skip_memory_check)
    fuse_for_decode(model)  # inference only: fused, GEMV-friendly weights (generate/fastpath.py)
    if engine_cls is None and not pageable(model):  # its cache keeps per-row state the pool cannot
        from lmzoo.generate.sequential import SequentialEngine as engine_cls

        print(f"lmzoo serve: {fam.name} is a {fam.shape} whose cache keeps per-row state the paged engine cannot "
              "hold, so requests run one at a time (lmzoo/generate/sequential.py)", file=sys.stderr)
    if engine_cls is None:
        from lmzoo.generate.continuous import Engine as engine_cls
    eng = engine_cls(model, block_size=block_size, num_blocks=num_blocks, max_batch=max_batch,
                     max_batched_tokens=max_batched_tokens, prefix_caching=True)
    eos = _eos_ids(model, tok)
    chat_stops = list(dict.fromkeys(eos + stop_ids(tok, source)))
    from lmzoo.interop.hub import repo_id_of

    name = served_name or repo_id_of(model_dir) or model_dir.resolve().name  # a Hub snapshot is served by its id
    served = Served(name=name, tok=tok, template=source, chat_stop_ids=chat_stops, eos_ids=eos,
                    vocab_size=model.config.vocab_size, engine=AsyncEngine(eng, max_queue=max_queue))
    return build_app(served, api_key=api_key)
