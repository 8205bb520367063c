"""A small typed client for `molmo serve`: chat (with images and points) and pointing.

    from clients.molmo_client import MolmoClient

    with MolmoClient("http://127.0.0.1:8000", api_key=None) as client:
        reply = client.chat("What is in the image?", images=["photo.jpg"], max_tokens=64)
        print(reply.text, reply.points)
        for p in client.point("photo.jpg", "red circles"):
            print(p.x, p.y)              # pixels of the image as the user sees it (EXIF applied)

Images may be file paths, raw bytes, PIL images, data: URLs or http(s) URLs (the last only
if the server allows remote images). Errors come back as `MolmoAPIError` with the server's
status, message, param and code. Only httpx (and Pillow for PIL inputs) is needed; the
official `openai` client works with the same server too, this one adds the `points`.
"""

from __future__ import annotations

import base64
import io
import json
import mimetypes
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ImageInput = str | Path | bytes | Any  # path, data:/http(s) URL, encoded bytes or a PIL image


class MolmoAPIError(Exception):
    """An error response of the server (OpenAI-shaped)."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(f"HTTP {status}: {message}" + (f" (param {param})" if param else ""))
        self.status, self.message, self.param, self.code = status, message, param, code


@dataclass
class Point:
    x: float | None  # pixels; None when the point names an image the request did not have
    y: float | None
    x_norm: float  # 0-1 of the image width
    y_norm: float  # 0-1 of the image height
    label: str | None = None
    image_index: int = 0  # which of the request's images (0-based)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Point:
        return cls(
            x=d.get("x"),
            y=d.get("y"),
            x_norm=d["x_norm"],
            y_norm=d["y_norm"],
            label=d.get("label"),
            image_index=d.get("image_index", 0),
        )


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass
class ChatReply:
    text: str
    points: list[Point]
    finish_reason: str | None
    usage: Usage | None
    choices: list[ChatReply] = field(default_factory=list)  # all choices when n > 1
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


def image_url(image: ImageInput) -> str:
    """An image as the URL the server takes (data: URL unless it already is a URL)."""
    if isinstance(image, str) and image.startswith(("data:", "http://", "https://")):
        return image
    if isinstance(image, (str, Path)):
        path = Path(image)
        mime = mimetypes.guess_type(path.name)[0] or "image/png"
        return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"
    if isinstance(image, (bytes, bytearray)):
        return f"data:image/png;base64,{base64.b64encode(bytes(image)).decode()}"
    if hasattr(image, "save"):  # a PIL image
        buf = io.BytesIO()
        image.save(buf, "PNG")
        return f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"
    raise ValueError(f"image: expected a path, URL, bytes or PIL image, got {type(image).__name__}")


class MolmoClient:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        model: str | None = None,
        timeout: float = 300.0,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model = model
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def __enter__(self) -> MolmoClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ---------------------------------------------------------------- API

    def health(self) -> bool:
        return self._http.get("/health").status_code == 200

    def models(self) -> list[str]:
        return [m["id"] for m in self._request("GET", "/v1/models")["data"]]

    def chat(
        self,
        prompt: str | None = None,
        images: Sequence[ImageInput] = (),
        *,
        messages: list[dict[str, Any]] | None = None,
        system: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        n: int = 1,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        **extra: Any,
    ) -> ChatReply:
        """One chat turn (`prompt` + `images`) or a whole OpenAI `messages` list."""
        body = self._chat_body(prompt, images, messages, system)
        body.update(
            {
                k: v
                for k, v in {
                    "max_tokens": max_tokens,
                    "temperature": temperature,
                    "stop": stop,
                    "seed": seed,
                }.items()
                if v is not None
            }
        )
        body.update(n=n, **extra)
        data = self._request("POST", "/v1/chat/completions", json=body)
        choices = [
            ChatReply(
                text=c["message"].get("content") or "",
                points=[Point.from_json(p) for p in c["message"].get("points", [])],
                finish_reason=c.get("finish_reason"),
                usage=None,
            )
            for c in data["choices"]
        ]
        first = choices[0]
        return ChatReply(
            text=first.text,
            points=first.points,
            finish_reason=first.finish_reason,
            usage=Usage(**data["usage"]),
            choices=choices,
            raw=data,
        )

    def stream_chat(
        self,
        prompt: str | None = None,
        images: Sequence[ImageInput] = (),
        *,
        messages: list[dict[str, Any]] | None = None,
        system: str | None = None,
        **params: Any,
    ) -> Iterator[str | list[Point]]:
        """Yields text pieces as they come, then the answer's points (a list) at the end."""
        body = self._chat_body(prompt, images, messages, system) | params | {"stream": True}
        with self._http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                raise self._error(r)
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    e = chunk["error"]
                    raise MolmoAPIError(500, e.get("message", ""), e.get("param"), e.get("code"))
                for choice in chunk.get("choices", []):
                    delta = choice.get("delta", {})
                    if delta.get("content"):
                        yield delta["content"]
                    if "points" in delta:
                        yield [Point.from_json(p) for p in delta["points"]]

    def point(
        self, image: ImageInput, object: str, max_tokens: int | None = None, **extra: Any
    ) -> list[Point]:
        """Where `object` is in `image`: pixel coordinates of the image as the user sees it.
        An empty list when the model says it is not there."""
        return self.point_full(image, object, max_tokens=max_tokens, **extra)["points"]

    def point_full(
        self, image: ImageInput, object: str, max_tokens: int | None = None, **extra: Any
    ) -> dict[str, Any]:
        """The whole /v1/point answer: points, count, the model's raw text and usage."""
        body: dict[str, Any] = {"image": image_url(image), "object": object, **extra}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if self.model:
            body["model"] = self.model
        data = self._request("POST", "/v1/point", json=body)
        data["points"] = [Point.from_json(p) for p in data["points"]]
        return data

    # ---------------------------------------------------------------- plumbing

    def _chat_body(
        self,
        prompt: str | None,
        images: Sequence[ImageInput],
        messages: list[dict[str, Any]] | None,
        system: str | None,
    ) -> dict[str, Any]:
        if (prompt is None) == (messages is None):
            raise ValueError("chat: give either prompt (with optional images) or messages")
        if messages is None:
            content: list[dict[str, Any]] = [
                {"type": "image_url", "image_url": {"url": image_url(im)}} for im in images
            ]
            content.append({"type": "text", "text": prompt})
            messages = [{"role": "user", "content": content}]
        if system is not None:
            messages = [{"role": "system", "content": system}, *messages]
        body: dict[str, Any] = {"messages": messages}
        if self.model:
            body["model"] = self.model
        return body

    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        r = self._http.request(method, path, **kwargs)
        if r.status_code != 200:
            raise self._error(r)
        return r.json()

    @staticmethod
    def _error(r: httpx.Response) -> MolmoAPIError:
        try:
            e = r.json()["error"]
            return MolmoAPIError(r.status_code, e.get("message", ""), e.get("param"), e.get("code"))
        except (ValueError, KeyError, TypeError):
            return MolmoAPIError(r.status_code, r.text[:500])
