"""The HTTP layer: the OpenAI API (and vLLM's adapter loading) on FastAPI, in front of the engine.

    GET  /health                     open to all (load balancers' health checks)
    GET  /v1/models, /v1/models/ID   the base, each adapter (with its ``parent``) and each mixture
    POST /v1/completions             OpenAI's bodies, plus lorakit's ``adapters`` and ``return_routing``
    POST /v1/chat/completions        the same, the chat template applied
    POST /v1/load_lora_adapter       vLLM's ``{lora_name, lora_path}``; off unless allowed, confined to a root
    POST /v1/unload_lora_adapter     vLLM's ``{lora_name}``
    GET  /metrics                    Prometheus text format

Every error is OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: a request the server
refuses gets its 4xx naming the field (:class:`RequestError`), a full queue 429 with ``Retry-After``, and
anything unexpected a 500 that is logged while the server goes on serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lorakit.errors import ConfigError, LorakitError
from lorakit.serve.answers import Answer, respond, stream
from lorakit.serve.auth import BearerAuth
from lorakit.serve.cards import AdapterBusy, ModelCard
from lorakit.serve.protocol import ChatBody, CompletionBody, LoadAdapterBody, UnloadAdapterBody, parse
from lorakit.serve.requests import GenerationRequest, QueueFull, RequestError, RequestHandle
from lorakit.serve.responses import ChatFormat, CompletionFormat, TokenStrings, error_response
from lorakit.serve.server_metrics import RequestCounter, ServerMetrics

MAX_BODY_BYTES = 8 * 2 ** 20
"""The largest request body read (a prompt longer than any context fits many times)."""
UNLOAD_WAIT_S = 30.0
"""How long an unload waits for the requests using the adapter before it is refused (409)."""

log = logging.getLogger("lorakit.serve")


@dataclass(frozen=True)
class Settings:
    """What the routes need besides the engine."""

    metrics: ServerMetrics
    strings: TokenStrings
    allow_runtime_loading: bool
    adapter_root: Path | None


def build_app(engine, *, api_key: str | None, allow_runtime_loading: bool, adapter_root: Path | None,
              metrics: ServerMetrics | None = None) -> FastAPI:
    """The ASGI application serving ``engine`` (an :class:`~lorakit.serve.engine.Engine`, started by the caller).

    ``api_key``: required as ``Authorization: Bearer`` on every path but ``/health`` (None: no key).
    ``allow_runtime_loading``: enable the load/unload endpoints, confined to ``adapter_root`` (required then).
    ``metrics``: the metrics whose ``observer`` the engine was opened with (None: new ones, whose token
    counts and latencies then stay empty; the queue depth and running batch are read from the engine)."""
    if allow_runtime_loading and adapter_root is None:
        raise ConfigError("runtime loading needs an adapter root: the directory loaded adapters must sit under")
    app = FastAPI(title="lorakit", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    metrics = metrics or ServerMetrics()
    metrics.watch(engine)
    app.state.settings = Settings(metrics, TokenStrings(engine.tokenizer), allow_runtime_loading,
                                  None if adapter_root is None else Path(adapter_root).resolve())
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", model, methods=["GET"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/load_lora_adapter", load_adapter, methods=["POST"])
    app.add_api_route("/v1/unload_lora_adapter", unload_adapter, methods=["POST"])
    app.add_api_route("/metrics", metrics_text, methods=["GET"])
    app.add_exception_handler(LorakitError, lorakit_error)
    app.add_exception_handler(HTTPException, http_error)
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)
    app.add_middleware(Unexpected)
    app.add_middleware(RequestCounter, metrics=metrics)
    return app


async def health(request: Request) -> dict:
    return {"status": "ok"}


async def models(request: Request) -> dict:
    return {"object": "list", "data": [_card(card) for card in request.app.state.engine.cards()]}


async def model(request: Request, model_id: str) -> dict:
    for card in request.app.state.engine.cards():
        if card.id == model_id:
            return _card(card)
    raise RequestError("model", f"no model named {model_id!r} is served", status=404)


async def completions(request: Request) -> Response:
    engine = request.app.state.engine
    body: CompletionBody = parse(CompletionBody, await read_json(request))
    generation = await run_in_threadpool(body.requests, engine.tokenizer)
    echoed = [prompt if isinstance(prompt, str) else engine.tokenizer.decode(list(prompt))
              for prompt in body.prompt] if body.echo else []
    answer = Answer(_submit(engine, generation), _format(CompletionFormat, request, body, body.logprobs is not None),
                    echoed, body.include_usage)
    return await _reply(request, answer, bool(body.stream))


async def chat_completions(request: Request) -> Response:
    engine = request.app.state.engine
    body: ChatBody = parse(ChatBody, await read_json(request))
    generation = await run_in_threadpool(body.request_for, engine.tokenizer, engine.context_length)
    answer = Answer(_submit(engine, [generation]), _format(ChatFormat, request, body, bool(body.logprobs)),
                    (), body.include_usage)
    return await _reply(request, answer, bool(body.stream))


async def load_adapter(request: Request) -> Response:
    """Register (or reload, under a taken name) a directory under the adapter root; new requests use it."""
    settings: Settings = request.app.state.settings
    if not settings.allow_runtime_loading:
        return _loading_off()
    body: LoadAdapterBody = parse(LoadAdapterBody, await read_json(request))
    card = await run_in_threadpool(request.app.state.engine.register, body.lora_name, body.lora_path,
                                   root=settings.adapter_root)
    return JSONResponse(_card(card))


async def unload_adapter(request: Request) -> Response:
    """Forget a registered adapter; waits for the requests using it, or is refused (409)."""
    if not request.app.state.settings.allow_runtime_loading:
        return _loading_off()
    body: UnloadAdapterBody = parse(UnloadAdapterBody, await read_json(request))
    await run_in_threadpool(request.app.state.engine.unload, body.lora_name, wait=UNLOAD_WAIT_S)
    return JSONResponse({"id": body.lora_name, "object": "model", "deleted": True})


async def metrics_text(request: Request) -> Response:
    content, content_type = request.app.state.settings.metrics.render()
    return Response(content, media_type=content_type)


async def read_json(request: Request) -> Any:
    """The body as JSON (at most :data:`MAX_BODY_BYTES`), or a 400 saying what is wrong with it."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise RequestError("body", f"is larger than {MAX_BODY_BYTES} bytes", status=413)
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError("body", f"is not valid JSON ({error})") from None
    except RecursionError:
        raise RequestError("body", "is nested too deeply to be read as JSON") from None


async def lorakit_error(request: Request, error: LorakitError) -> Response:
    """What the server refuses, as OpenAI's error body: the status of each kind of refusal."""
    if isinstance(error, QueueFull):
        return error_response(429, str(error), code="queue_full", headers={"Retry-After": str(error.retry_after)})
    if isinstance(error, RequestError):
        code = "model_not_found" if error.status == 404 else None
        return error_response(error.status, str(error), param=error.field or None, code=code)
    return error_response(409 if isinstance(error, AdapterBusy) else 400, str(error))


async def http_error(request: Request, error: HTTPException) -> Response:
    return error_response(error.status_code, str(error.detail), headers=error.headers)


class Unexpected:
    """ASGI middleware: an exception nothing else handled is logged and answered with a 500 (if the response
    has not started), and the server goes on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as error:
            log.exception("unexpected error answering %s %s", scope.get("method"), scope.get("path"))
            if scope["type"] == "http" and not started:
                response = error_response(500, f"internal server error ({type(error).__name__}: {error})",
                                          code="internal_error")
                await response(scope, receive, send)


def _submit(engine, requests: list[GenerationRequest]) -> list[RequestHandle]:
    """Submit every request, or none: a refusal of one cancels those already queued."""
    loop = asyncio.get_running_loop()
    handles: list[RequestHandle] = []
    try:
        for generation in requests:
            handles.append(engine.submit(generation, loop))
    except BaseException:
        for handle in handles:
            handle.cancel()
        raise
    return handles


def _format(kind, request: Request, body, logprobs: bool):
    return kind(body.model, request.app.state.settings.strings, logprobs=logprobs, routing=bool(body.return_routing))


async def _reply(request: Request, answer: Answer, streaming: bool) -> Response:
    if streaming:
        return StreamingResponse(stream(answer), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await respond(request, answer)


def _card(card: ModelCard) -> dict:
    """A model in OpenAI's list format, with vLLM's ``root`` and ``parent`` and lorakit's ``kind``."""
    return {"id": card.id, "object": "model", "created": card.created, "owned_by": "lorakit",
            "root": card.path or card.id, "parent": card.parent, "kind": card.kind}


def _loading_off() -> Response:
    return error_response(403, "runtime loading is off: start the server with --allow-runtime-loading and "
                               "--adapter-root DIR to load and unload adapters", code="runtime_loading_disabled")
