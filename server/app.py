"""The FastAPI app: thin routes over `Serving`, a gate middleware, OpenAI-shaped errors.

    app = create_app(ServerConfig(model=DIR))            # engine starts in the background
    app = create_app(config, engine_factory=None)        # no engine: /health stays 503

Routes: POST /v1/chat/completions, POST /v1/point, GET /v1/models, GET /health (200 once
the engine is ready, 503 before), GET /metrics (Prometheus); GET / is the playground page
(server/playground.py; off with --no-ui).

The gate (outermost, pure ASGI) counts every request by route and status, checks the API
key on /v1/*, and enforces the body limit: a Content-Length over it, or a streamed body
that grows over it, gets 413 before the app parses anything; a body not received within
--body-read-timeout gets 408, and a client that leaves during its upload is counted as 499.
A dead engine makes the server exit with status 1 (see the lifespan).
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.config import ServerConfig
from server.engine import ModelInfo, build_engine
from server.errors import APIError
from server.metrics import CONTENT_TYPE, ServerMetrics
from server.playground import playground_router
from server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ErrorResponse,
    LoadLoRAAdapterRequest,
    ModelCard,
    ModelList,
    PointManyResponse,
    PointRequest,
    PointResponse,
    UnloadedModel,
    UnloadLoRAAdapterRequest,
)
from server.serving import Serving

logger = logging.getLogger("server")
LARGE_BODY_BYTES = 256 * 1024  # JSON bodies above this are parsed off the event loop

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in [
        (400, "Invalid request (bad field, image, too many images, prompt too long)"),
        (401, "Missing or wrong API key"),
        (403, "Run-time adapter loading is off"),
        (404, "Unknown model or adapter"),
        (408, "Request body not received in time"),
        (413, "Request body too large"),
        (429, "Queue full"),
        (503, "Engine not ready"),
    ]
}


def create_app(
    config: ServerConfig,
    engine_factory: Callable[[ServerConfig], Any] | None = build_engine,
) -> FastAPI:
    info = ModelInfo.from_dir(config.model, config.served_model_name)
    tokenizer = info.tokenizer()
    metrics = ServerMetrics()
    serving = Serving(config, info, tokenizer, metrics)
    built = threading.Event()  # the engine thread has finished (engine or exception in box)
    box: list[Any] = []  # no future keeps the engine alive (see the lifespan's end)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        start = asyncio.create_task(_start_engine(app)) if engine_factory is not None else None
        try:
            yield
        finally:
            if start is not None and not start.done():
                start.cancel()
                with suppress(asyncio.CancelledError):
                    await start
                # Stopped while the engine was starting: let it finish (for a while), then
                # shut it down; an engine still starting is left to the process's exit.
                if not await asyncio.to_thread(built.wait, config.shutdown_timeout):
                    logger.error(
                        "engine still starting after %g s; exiting", config.shutdown_timeout
                    )
                    app.state.startup_error = TimeoutError("engine start interrupted")
                if box and not isinstance(box[0], Exception):
                    serving.engine = box.pop()
            await serving.aclose()
            engine, serving.engine = serving.engine, None
            if engine is not None:
                engine.shutdown()
                # Drop the last reference now: vLLM's AsyncLLM.__del__ shuts down again and
                # fails noisily if it only runs at interpreter exit.
                del engine
                gc.collect()

    async def _start_engine(app: FastAPI) -> None:
        t = time.perf_counter()
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def build() -> None:
            try:
                box.append(engine_factory(config))
            except Exception as e:
                box.append(e)
            built.set()
            loop.call_soon_threadsafe(done.set)

        threading.Thread(target=build, name="engine-start", daemon=True).start()
        try:
            await asyncio.wait_for(done.wait(), config.engine_start_timeout)
        except TimeoutError:
            box.append(TimeoutError(f"not ready in {config.engine_start_timeout:g} s"))
        engine = box.pop()
        if isinstance(engine, Exception):  # the server cannot serve: say why and stop
            logger.error("engine failed to start", exc_info=engine)
            app.state.startup_error = engine
            os.kill(os.getpid(), signal.SIGTERM)
            return
        try:  # the start-up adapters, so that no first request waits for one to load
            await serving.preload_adapters(engine)
        except Exception as e:
            logger.error("an adapter failed to load", exc_info=e)
            app.state.startup_error = e
            os.kill(os.getpid(), signal.SIGTERM)
            return
        serving.attach(engine)
        logger.info("engine ready in %.1f s; serving %s", time.perf_counter() - t, info.name)
        # A dead engine never recovers: exit (non-zero) so that a supervisor restarts us.
        while not engine.errored:
            await asyncio.sleep(1.0)
        logger.error("the engine has died; shutting the server down")
        app.state.engine_died = True
        os.kill(os.getpid(), signal.SIGTERM)

    app = FastAPI(
        title="Molmo server",
        version="0.1.0",
        description="OpenAI-compatible chat completions with points, and a pointing API.",
        lifespan=lifespan,
    )
    app.state.serving = serving
    app.state.startup_error = None
    app.state.engine_died = False
    app.router.route_class = _OffLoopJSON

    # ---------------------------------------------------------------- errors

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return validation_error(e.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return APIError(
            e.status_code, str(e.detail), headers=getattr(e, "headers", None)
        ).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return APIError(
            500, f"internal error: {type(e).__name__}", code="internal_error"
        ).response()

    # ---------------------------------------------------------------- routes

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}}},
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        t0 = time.perf_counter()
        slot = serving.admit()
        try:
            if body.stream:  # the response releases the slot when the stream ends
                return SSEResponse(await serving.chat(body, t0, slot), on_close=slot.release)
            result = await _until_disconnect(request, serving.chat(body, t0, slot))
        except BaseException:
            slot.release()
            raise
        slot.release()
        return result

    @app.post(
        "/v1/point", response_model=PointResponse | PointManyResponse, responses=_ERRORS
    )
    async def point(body: PointRequest, request: Request) -> Any:
        t0 = time.perf_counter()
        slot = serving.admit()
        try:
            return await _until_disconnect(request, serving.point(body, t0, slot))
        finally:
            slot.release()

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def models() -> ModelList:
        base = ModelCard(id=info.name, root=info.path, max_model_len=serving.max_model_len)
        adapters = [
            ModelCard(id=a.name, root=a.path, parent=info.name, max_model_len=serving.max_model_len)
            for a in serving.served_adapters()
        ]
        return ModelList(data=[base, *adapters])

    @app.post("/v1/load_lora_adapter", response_model=ModelCard, responses=_ERRORS)
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> ModelCard:
        adapter = await serving.load_adapter(body.lora_name, body.lora_path)
        return ModelCard(id=adapter.name, root=adapter.path, parent=info.name,
                         max_model_len=serving.max_model_len)  # fmt: skip

    @app.post("/v1/unload_lora_adapter", response_model=UnloadedModel, responses=_ERRORS)
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> UnloadedModel:
        adapter = await serving.unload_adapter(body.lora_name)
        return UnloadedModel(id=adapter.name)

    @app.get("/health", responses={503: _ERRORS[503]})
    async def health() -> Response:
        if not serving.ready:
            return APIError(503, "the engine is not ready", code="engine_not_ready").response()
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", response_class=Response)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    if config.ui:
        app.include_router(playground_router())

    app.add_middleware(
        Gate,
        metrics=metrics,
        api_key=config.api_key,
        max_body_bytes=config.max_body_bytes,
        body_timeout=config.body_read_timeout,
    )
    return app


def validation_error(errors: Any) -> APIError:
    """FastAPI's validation errors -> a 400 naming the bad field (`messages[0].role`).

    For a union (message content is a string or a list of parts) pydantic reports each
    branch; the deepest error is the one that says what is wrong.
    """
    errors = [dict(e) for e in errors or []]
    if any(e.get("type") == "json_invalid" for e in errors):
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    first = max(errors, key=lambda e: len(e.get("loc", ())), default={})
    param = _param(first.get("loc", ()))
    message = str(first.get("msg", "invalid request"))
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
        head, sep, rest = message.partition(": ")
        if sep and head.isidentifier():  # our validators write "field: why"
            param, message = head, rest
    return APIError(
        400,
        f"{param}: {message}" if param else message,
        param=param or None,
        code="missing_required_parameter" if first.get("type") == "missing" else "invalid_value",
    )


def _param(loc: Any) -> str:
    """('body', 'messages', 0, 'content', 'list[tagged-union[..]]', 1, 'image_url', 'image_url',
    'url') -> 'messages[0].content[1].image_url.url': drops pydantic's branch and tag names."""
    out = ""
    tag_next = False
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        if part == "body" and not out:
            continue
        if "[" in part or part in ("str", "int", "float", "bool", "none"):
            tag_next = tag_next or "tagged-union" in part
            continue
        if tag_next:  # the discriminator value pydantic puts after the list index
            tag_next = False
            continue
        out += f".{part}" if out else part
    return out


async def _until_disconnect(request: Request, work: Any) -> Any:
    """Run `work`, cancelling it if the client goes away first (the engine then aborts)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with suppress(asyncio.CancelledError):
        await task
    return Response(status_code=499)  # the client is gone; nobody reads this


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _OffLoopJSON(APIRoute):
    """FastAPI's route, except that a large JSON body is parsed in a thread, not on the
    event loop (a 32 MB body takes a good part of a second to parse)."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            body = await request.body()
            if len(body) > LARGE_BODY_BYTES:
                with suppress(ValueError):  # FastAPI reports bad JSON itself
                    # Starlette's cache of the parsed body: FastAPI's handler reads it.
                    request._json = await asyncio.to_thread(json.loads, body)
            return await handler(request)

        return route


class SSEResponse(StreamingResponse):
    """Server-sent events; `on_close` runs however the stream ends (done, error, disconnect)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


class Gate:
    """Request counting, API key and body limit, in front of the app (pure ASGI)."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: ServerMetrics,
        api_key: str | None,
        max_body_bytes: int,
        body_timeout: float = 30.0,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if not await self._serve(scope, receive, send_counted):
                status[0] = 499  # the client left before its request was read: not our fault
        finally:
            route = self.metrics.route_label(scope["path"])
            self.metrics.requests.labels(route=route, status=str(status[0])).inc()

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Serve the request; False when the client disconnected during its upload."""
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"].startswith("/v1/"):
            auth = headers.get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                error = APIError(
                    401,
                    "missing or invalid API key (send 'Authorization: Bearer <key>')",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await error.response()(scope, receive, send)
                return True
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await APIError(400, "malformed Content-Length header").response()(
                    scope, receive, send
                )
                return True
            if int(declared) > self.max_body_bytes:
                await self._too_large()(scope, receive, send)
                return True
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return True
        if b"json" not in headers.get(b"content-type", b""):
            # Every body here is JSON; `curl -d` labels it form data, which would hide the
            # real error behind "not a valid dictionary".
            scope = dict(scope)
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope["headers"].append((b"content-type", b"application/json"))
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.body_timeout):  # a slow upload holds a connection
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return False
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_body_bytes:
                        await self._too_large()(scope, receive, send)
                        return True
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            error = APIError(
                408,
                f"the request body was not received within {self.body_timeout:g} s",
                code="request_timeout",
                headers={"Connection": "close"},
            )
            await error.response()(scope, receive, send)
            return True
        body = b"".join(chunks)
        del chunks
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls: the disconnect (streams listen for it)

        await self.app(scope, replay, send)
        return True

    def _too_large(self) -> JSONResponse:
        return APIError(
            413,
            f"request body is larger than {self.max_body_bytes} bytes",
            code="request_too_large",
        ).response()
