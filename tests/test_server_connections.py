"""The HTTP connection layer (server/connections.py) on a real uvicorn server and real sockets:
the header deadline, malformed HTTP and the connection limit answer in the API's error shape.

The server runs in a thread of this process with a stand-in app (no engine: what is tested
happens before any app code runs); tests/test_server_hardening.py checks the same against
`molmo serve` with its engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from helpers import free_port

from server.connections import protocol_class


async def hello(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]}
    )
    await send({"type": "http.response.body", "body": b"hello"})


@contextlib.contextmanager
def serving(header_timeout: float, max_connections: int = 100) -> Iterator[int]:
    port = free_port()
    config = uvicorn.Config(
        hello,
        host="127.0.0.1",
        port=port,
        http=protocol_class(header_timeout),
        limit_concurrency=max_connections,
        log_level="warning",
        lifespan="off",
    )
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(30)


def exchange(port: int, data: bytes) -> bytes:
    """Send `data`, then read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def error_of(response: bytes, status: int) -> dict:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), response[:200]
    assert b"content-type: application/json" in head.lower()
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def test_headers_not_finished_in_time_get_408_and_idle_connections_are_closed() -> None:
    with serving(header_timeout=0.5) as port:
        # Half a request, then nothing: 408 in the API's shape, the connection closed.
        err = error_of(exchange(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"), 408)
        assert err["code"] == "request_timeout" and "headers" in err["message"]
        # A connection that never sends a byte is closed without an answer.
        assert exchange(port, b"") == b""
        # A whole request is served; the deadline is per request's headers, not the connection.
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            for _ in range(2):
                s.sendall(GET)
                reply = b""
                while not reply.endswith(b"hello"):
                    chunk = s.recv(65536)
                    assert chunk, reply
                    reply += chunk
                assert reply.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize(
    "data",
    [
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header\x00: x\r\n\r\n",
    ],
)
def test_malformed_http_is_an_api_shaped_400(data: bytes) -> None:
    with serving(header_timeout=30) as port:
        err = error_of(exchange(port, data), 400)
        assert err["code"] == "invalid_http"


def test_over_the_connection_limit_is_an_api_shaped_503() -> None:
    with serving(header_timeout=60, max_connections=3) as port:
        # Accepted in the order they connect (the listening socket's queue), so the two held
        # connections are counted before the third one's request is read.
        held = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(2)]
        try:
            err = error_of(exchange(port, GET), 503)
            assert err["code"] == "server_busy"
        finally:
            for s in held:
                s.close()
        # The server counts the closed ones out as it notices them: polled, not timed.
        closing = GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
        deadline = time.monotonic() + 60
        while not (reply := exchange(port, closing)).startswith(b"HTTP/1.1 200"):
            assert time.monotonic() < deadline, reply[:200]
            time.sleep(0.05)
