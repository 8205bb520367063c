"""The HTTP connection layer under the app: uvicorn's httptools protocol with a header deadline
and OpenAI-shaped errors for what uvicorn answers itself.

uvicorn arms no timer while it waits for a request's headers (only between requests on a
kept-alive connection), so a client that connects and sends nothing, or a header line now and
then, holds a connection for good; `--max-connections` of them would shut everyone else out.
Here a connection has `header_timeout` seconds to finish each request's headers: a fresh
connection that sent nothing is closed, one that stopped half-way gets a 408. Once the headers
are in, the body has its own deadline (the app's Gate, `--body-read-timeout`).

Malformed HTTP (uvicorn's parser, before any app code runs) and connections over the limit
answer as the rest of the API does, `{"error": {...}}`, not uvicorn's plain text.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from server.errors import APIError

logger = logging.getLogger(__name__)


def protocol_class(header_timeout: float) -> type[asyncio.Protocol]:
    """uvicorn's `http=` protocol for a server whose clients get `header_timeout` seconds to
    send each request's headers."""

    class Protocol(MolmoHttpProtocol):
        pass

    Protocol.header_timeout = header_timeout
    return Protocol


class MolmoHttpProtocol(HttpToolsProtocol):
    header_timeout: float = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The limit is checked here, so that the 503 has the API's shape.
        self._limit = self.limit_concurrency
        self.limit_concurrency = None
        self._header_deadline: asyncio.TimerHandle | None = None
        self._started = False  # bytes of the current request have arrived

    # ------------------------------------------------------------ the header deadline

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._started = True
        if self._header_deadline is None:  # a kept-alive connection's next request
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        self._started = False
        if self._limit is not None and (
            len(self.connections) >= self._limit or len(self.tasks) >= self._limit
        ):
            logger.warning("over --max-connections (%d): answered 503", self._limit)
            app, self.app = self.app, _over_the_limit
            try:
                super().on_headers_complete()
            finally:
                self.app = app
            return
        super().on_headers_complete()

    def _arm(self) -> None:
        self._disarm()
        self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_late(self) -> None:
        self._header_deadline = None
        if self.transport.is_closing():
            return
        if self._started:  # a request begun and never finished: say why it is dropped
            self._write_error(
                APIError(
                    408,
                    f"the request headers were not received within {self.header_timeout:g} s",
                    code="request_timeout",
                )
            )
        self.transport.close()

    # ------------------------------------------------------------ uvicorn's own answers

    def send_400_response(self, msg: str) -> None:
        """Malformed HTTP (bad framing, a bad header line), found by uvicorn's parser."""
        self._write_error(
            APIError(400, "malformed HTTP request (framing or headers)", code="invalid_http")
        )
        self.transport.close()

    def _write_error(self, error: APIError) -> None:
        body = json.dumps(error.body()).encode()
        head = [STATUS_LINE[error.status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)


async def _over_the_limit(scope: Any, receive: Any, send: Any) -> None:
    error = APIError(
        503,
        "the server has too many open connections (--max-connections); retry shortly",
        code="server_busy",
        headers={"Retry-After": "1", "Connection": "close"},
    )
    await error.response()(scope, receive, send)
