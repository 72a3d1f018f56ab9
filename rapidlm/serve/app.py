"""The FastAPI application: OpenAI-compatible routes over an AsyncEngine, probes, metrics and the playground.

create_app(engine, tokenizer, model_name, config) builds it; rapidlm.serve.server runs it under uvicorn.
Every failure a client can cause is answered as OpenAI's {"error": {message, type, param, code}} with a 4xx
status: 422 when the body does not fit the schema (the field is named in `param`), 400 when it fits but
cannot be served (n > 1, a prompt too long for the context, ...), 401/404/413/429/503 as their names say.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from rapidlm.serve.auth import APIKeyMiddleware
from rapidlm.serve.config import ServerConfig
from rapidlm.serve.generation import (
    Jobs,
    admit,
    chat_response,
    collect,
    completion_response,
    stream_chat,
    stream_completion,
)
from rapidlm.serve.limits import BodySizeLimitMiddleware
from rapidlm.serve.logprobs import TokenTexts
from rapidlm.serve.metrics import CONTENT_TYPE, ServerMetrics
from rapidlm.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    Health,
    ModelCard,
    ModelList,
    bind_model_limits,
    error_responses,
    new_id,
)

log = logging.getLogger("rapidlm.serve")
STATIC_DIR = Path(__file__).parent / "static"
_T = TypeVar("_T")

_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "bytes"})
_GENERATE_ERRORS = error_responses(400, 401, 404, 413, 422, 429, 503)
# With stream=true: server-sent events, each `data:` a JSON chunk (the same model with deltas), then [DONE].
_SSE_EVENT = {
    "type": "object",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}},
    "required": ["data"],
}
_STREAM_CONTENT = {"text/event-stream": {"schema": _SSE_EVENT}}


@dataclass
class ServerState:
    engine: Any
    model_name: str
    config: ServerConfig
    metrics: ServerMetrics
    texts: TokenTexts
    jobs: Jobs
    draining: bool = False


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; its work has been aborted."""


class EventStreamResponse(StreamingResponse):
    """Server-sent events that end the work behind them when the client disconnects.

    It listens for the disconnect while streaming (a queued request sends nothing for a while, so waiting for
    a failed write is not enough) and always closes its iterator, which aborts the engine requests at once
    instead of whenever the garbage collector finalizes it.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes]) -> None:
        super().__init__(content, headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client is gone (uvicorn raises ClientDisconnected, an OSError)
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


async def until_disconnect(request: Request, work: Awaitable[_T]) -> _T:
    """Await `work`, cancelling it if the client disconnects first (then raise ClientDisconnected)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                task.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            raise ClientDisconnected() from None
        raise
    finally:
        watcher.cancel()


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    first = errors[0] if errors else {}
    raw_loc = tuple(first.get("loc", ()))
    if raw_loc[:1] == ("body",):
        raw_loc = raw_loc[1:]
    loc: list[str] = []
    for part in raw_loc:
        # A union's branch shows up as a tag ("constrained-str", "list[int]", "str"): the field ends there.
        if isinstance(part, str) and (not part.isidentifier() or part in _TYPE_TAGS):
            break
        loc.append(str(part))
    ctx = first.get("ctx") or {}
    param = ctx.get("param") if isinstance(ctx, dict) else None
    param = param or (".".join(loc) if loc else None)
    msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    message = f"{param}: {msg}" if param and not msg.startswith(f"{param}:") else msg
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return APIError(422, message, param, "invalid_value")


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def create_app(engine: Any, tokenizer: Any, model_name: str, config: ServerConfig | None = None) -> FastAPI:
    """The server for one model. `engine` is an AsyncEngine (already started, or started by the caller)."""
    config = config or ServerConfig()
    metrics = ServerMetrics(engine)
    state = ServerState(engine, model_name, config, metrics, TokenTexts(tokenizer), Jobs(engine, tokenizer))
    from rapidlm import __version__

    app = FastAPI(
        title="rapidlm",
        version=__version__,
        description="OpenAI-compatible completions and chat completions served by rapidlm.",
        docs_url=None,  # Swagger UI loads from a CDN; /openapi.json is enough for clients and fuzzers
        redoc_url=None,
    )
    app.state.rapidlm = state

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            bind_model_limits(FastAPI.openapi(app), model_name, state.jobs.vocab_size, engine.max_model_len)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(APIError)
    async def on_api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        headers = dict(exc.headers) if exc.headers else None  # e.g. 405's Allow
        return _error_response(APIError(exc.status_code, str(exc.detail), code=code, headers=headers))

    @app.exception_handler(ClientDisconnected)
    async def on_disconnect(_: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody is listening; nginx's code for "client closed request"

    @app.exception_handler(Exception)
    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error while serving a request")
        return _error_response(APIError(500, f"internal server error: {type(exc).__name__}", code="internal_error"))

    def serving_check(model: str) -> None:
        if state.draining:
            metrics.rejected.labels(status="503").inc()
            raise APIError(503, "server is shutting down and admits no new requests", code="server_draining")
        if model != model_name:
            raise APIError(
                404,
                f"model {model!r} is not served here; this server serves {model_name!r}",
                "model",
                "model_not_found",
            )

    # Declared so the OpenAPI schema tells clients (and fuzzers) how to authenticate; the check itself is
    # APIKeyMiddleware's, which runs before the body is read.
    bearer = [Security(HTTPBearer(auto_error=False))] if config.api_key else []

    # ---- probes, metrics, playground ------------------------------------------------------------------

    @app.get("/health", response_model=Health, tags=["probes"])
    async def health() -> Health:
        """Liveness: the process answers."""
        return Health(status="ok")

    @app.get("/ready", response_model=Health, responses=error_responses(503), tags=["probes"])
    async def ready() -> Health:
        """Readiness: the model is loaded, the engine loop is stepping and the server is not draining."""
        if state.draining:
            raise APIError(503, "draining: finishing running requests before shutdown", code="server_draining")
        if not engine.ready:
            raise APIError(503, "the engine is not running", code="engine_not_ready")
        return Health(status="ready")

    @app.get(
        "/metrics",
        tags=["probes"],
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # ---- OpenAI API -----------------------------------------------------------------------------------

    @app.get(
        "/v1/models", response_model=ModelList, dependencies=bearer, responses=error_responses(401), tags=["openai"]
    )
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, max_model_len=engine.max_model_len)])

    @app.get(
        "/v1/models/{model}",
        response_model=ModelCard,
        dependencies=bearer,
        responses=error_responses(401, 404),
        tags=["openai"],
    )
    async def get_model(model: str) -> ModelCard:
        if model != model_name:
            raise APIError(404, f"model {model!r} is not served here", "model", "model_not_found")
        return ModelCard(id=model_name, max_model_len=engine.max_model_len)

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        dependencies=bearer,
        tags=["openai"],
        responses={200: {"content": _STREAM_CONTENT}, **_GENERATE_ERRORS},
    )
    async def completions(req: CompletionRequest, request: Request) -> Any:
        serving_check(req.model)
        jobs = state.jobs.completion(req)
        rid = new_id("cmpl")
        running = await until_disconnect(request, admit(engine, metrics, rid, jobs))
        if req.stream:
            return EventStreamResponse(stream_completion(rid, model_name, req, running, state.texts))
        results = await until_disconnect(request, collect(running))
        return completion_response(rid, model_name, req, results, state.texts)

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        dependencies=bearer,
        tags=["openai"],
        responses={200: {"content": _STREAM_CONTENT}, **_GENERATE_ERRORS},
    )
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Any:
        serving_check(req.model)
        jobs = state.jobs.chat(req)
        rid = new_id("chatcmpl")
        running = await until_disconnect(request, admit(engine, metrics, rid, jobs))
        if req.stream:
            return EventStreamResponse(stream_chat(rid, model_name, req, running, state.texts))
        results = await until_disconnect(request, collect(running))
        return chat_response(rid, model_name, req, results, state.texts)

    # Added last = outermost: authentication runs first, so an unauthenticated client learns nothing else.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=config.max_body_bytes)
    app.add_middleware(APIKeyMiddleware, api_key=config.api_key)
    return app


async def drain(app: FastAPI, timeout: float) -> None:
    """Stop admitting (new requests get 503, /ready turns 503), let running requests finish for up to
    `timeout` seconds, then have the engine abort the rest (their clients get a clear error)."""
    state: ServerState = app.state.rapidlm
    state.draining = True
    await state.engine.drain(timeout)
