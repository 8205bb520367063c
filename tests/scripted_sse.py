"""A scripted OpenAI-style server for the load benchmark's tests (not a test module).

A tiny asyncio HTTP/1.1 server: GET /v1/models (the ids `models`: "scripted" unless given),
POST /v1/chat/completions (SSE) and POST /v1/point answer from a script,
`script(i, body) -> Reply` for the i-th request. An SSE
reply lists (offset seconds, event) pairs; an event is a dict (sent as JSON) or "[DONE]".

Two clocks:
- `FakeClock` (in-process, same event loop as the client): the server sets `clock.now` to
  request start + offset before each event and waits until the client has read the clock
  once (it reads it for every `data:` line), so every time the client records is exactly the
  scripted one, whatever the machine's speed;
- real time (`in_thread`): offsets are slept, for runs of the real CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


@dataclass
class Reply:
    events: list[tuple[float, Any]] = field(default_factory=list)  # SSE: (offset s, event)
    status: int = 200
    json_body: dict[str, Any] | None = None  # a JSON answer (errors, /v1/point)
    drop_after: int | None = None  # close the connection after this many events
    hang: bool = False  # never answer


def chunk(content: str | None = None, role: bool = False, finish: str | None = None, **delta: Any) -> dict:
    d = ({"role": "assistant"} if role else {}) | ({"content": content} if content is not None else {}) | delta
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": d, "finish_reason": finish}]}


def usage(prompt: int, completion: int) -> dict:
    return {"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                     "total_tokens": prompt + completion}}  # fmt: skip


def error(status: int, message: str) -> Reply:
    return Reply(status=status, json_body={"error": {"message": message, "type": "x", "param": None, "code": None}})


class ScriptedServer:
    def __init__(self, script: Callable[[int, dict], Reply], clock: FakeClock | None = None,
                 api_key: str | None = None, models: tuple[str, ...] = ("scripted",)) -> None:  # fmt: skip
        self.script, self.clock, self.api_key, self.models = script, clock, api_key, models
        self.requests: list[dict] = []  # bodies received (models probes excluded)
        self.got_request = threading.Event()
        self.server: asyncio.base_events.Server | None = None
        self.handlers: set[asyncio.Task] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for task in list(self.handlers):  # hanging replies included
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)

    async def _send(self, writer: asyncio.StreamWriter, status: int, body: bytes, ctype: str) -> None:
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                     "Connection: close\r\n\r\n".encode() + body)  # fmt: skip
        await writer.drain()

    async def _event(self, writer: asyncio.StreamWriter, base: float, offset: float, event: Any, last: float) -> None:
        if self.clock is None:
            await asyncio.sleep(max(0.0, offset - last))
        else:
            self.clock.now = base + offset
        reads = self.clock.reads if self.clock else 0
        data = event if isinstance(event, str) else json.dumps(event)
        writer.write(f"data: {data}\n\n".encode())
        await writer.drain()
        while self.clock is not None and self.clock.reads == reads:
            await asyncio.sleep(0)  # until the client has read (and timed) this line

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self.handlers.add(task)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            method, path, _ = head.split("\r\n")[0].split(" ")
            headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in head.split("\r\n")[1:] if h)}
            body = await reader.readexactly(int(headers.get("content-length", 0)))
            if self.api_key and headers.get("authorization") != f"Bearer {self.api_key}":
                r = error(401, "invalid API key")
                await self._send(writer, 401, json.dumps(r.json_body).encode(), "application/json")
                return
            if path == "/v1/models":
                models = {"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]}
                await self._send(writer, 200, json.dumps(models).encode(), "application/json")
                return
            req = json.loads(body or b"{}")
            i = len(self.requests)
            self.requests.append(req)
            self.got_request.set()
            reply = self.script(i, req)
            if reply.hang:
                await asyncio.Event().wait()
            if reply.json_body is not None:
                await self._send(writer, reply.status, json.dumps(reply.json_body).encode(), "application/json")
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
            base = self.clock.now if self.clock else 0.0
            last = 0.0
            for n, (offset, event) in enumerate(reply.events):
                if reply.drop_after is not None and n >= reply.drop_after:
                    writer.transport.abort()
                    return
                await self._event(writer, base, offset, event, last)
                last = offset
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.handlers.discard(task)
            writer.close()


@contextlib.contextmanager
def in_thread(script: Callable[[int, dict], Reply], api_key: str | None = None,
              models: tuple[str, ...] = ("scripted",)) -> Iterator[ScriptedServer]:  # fmt: skip
    """The server on its own event loop in a thread, in real time."""
    server = ScriptedServer(script, None, api_key, models)
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(30)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
