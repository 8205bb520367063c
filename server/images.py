"""Image inputs of a request -> decoded RGB PIL images (EXIF orientation applied).

Accepted: `data:image/<type>;base64,<data>` URLs; plain base64 (the /v1/point `image`
field); http(s) URLs only when the server runs with --allow-remote-images, fetched with
httpx under a size and a time limit. Decoding and the pixel limit are
`molmo_model.preprocessing.load_image`'s; its ImageError becomes a 400 naming the field.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re

import httpx
from PIL import Image

from molmo_model.preprocessing import ImageError, load_image
from server.errors import APIError, bad_request

_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[^,;]*)*),", re.ASCII)
_B64_JUNK = re.compile(rb"\s+")


def decode_base64(data: str, param: str) -> bytes:
    """Strict base64 (whitespace allowed, padding optional)."""
    raw = _B64_JUNK.sub(b"", data.encode("ascii", errors="replace"))
    raw += b"=" * (-len(raw) % 4)
    try:
        decoded = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if not decoded:
        raise bad_request("image data is not valid base64", param=param, code="invalid_image")
    return decoded


def split_data_url(url: str, param: str) -> bytes:
    """The bytes of a `data:` URL; only base64 image payloads are accepted."""
    m = _DATA_URL.match(url)
    if m is None:
        raise bad_request("malformed data: URL", param=param, code="invalid_image")
    mime = (m.group("mime") or "").lower()
    if mime and not mime.startswith("image/"):
        raise bad_request(
            f"data: URL has type {mime!r}, not an image", param=param, code="invalid_image"
        )
    if "base64" not in m.group("params").lower().split(";"):
        raise bad_request("data: URL must be base64-encoded", param=param, code="invalid_image")
    return decode_base64(url[m.end() :], param)


class ImageFetcher:
    """Turns the image references of a request into images, within the server's limits."""

    def __init__(
        self,
        max_pixels: int,
        allow_remote: bool = False,
        remote_timeout: float = 10.0,
        remote_max_bytes: int = 20 * 1024 * 1024,
    ) -> None:
        self.max_pixels = max_pixels
        self.allow_remote = allow_remote
        self.remote_timeout = remote_timeout
        self.remote_max_bytes = remote_max_bytes
        self._client: httpx.AsyncClient | None = None

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def fetch_bytes(self, ref: str, param: str, bare_base64: bool = False) -> bytes:
        ref = ref.strip()
        if ref[:5].lower() == "data:":
            return split_data_url(ref, param)
        if ref[:7].lower() == "http://" or ref[:8].lower() == "https://":
            if not self.allow_remote:
                raise bad_request(
                    "remote image URLs are disabled on this server; send a data: URL "
                    "(start the server with --allow-remote-images to allow them)",
                    param=param,
                    code="invalid_image",
                )
            return await self._download(ref, param)
        if bare_base64:
            return decode_base64(ref, param)
        raise bad_request(
            "image_url must be a data: URL" + (" or an http(s) URL" if self.allow_remote else ""),
            param=param,
            code="invalid_image",
        )

    async def load(self, ref: str, param: str, bare_base64: bool = False) -> Image.Image:
        """Fetch/decode one image; decoding runs in a thread (it is CPU work)."""
        data = await self.fetch_bytes(ref, param, bare_base64)
        try:
            return await asyncio.to_thread(load_image, data, self.max_pixels)
        except ImageError as e:
            raise bad_request(str(e), param=param, code="invalid_image") from None

    async def load_all(
        self, refs: list[tuple[str, str]], bare_base64: bool = False
    ) -> list[Image.Image]:
        return list(await asyncio.gather(*(self.load(r, p, bare_base64) for r, p in refs)))

    async def _download(self, url: str, param: str) -> bytes:
        if self._client is None:
            self._client = httpx.AsyncClient(follow_redirects=True, max_redirects=3)
        try:
            return await asyncio.wait_for(self._read(url, param), self.remote_timeout)
        except TimeoutError:
            raise bad_request(
                f"fetching the image took longer than {self.remote_timeout:g} s",
                param=param,
                code="invalid_image",
            ) from None
        except httpx.HTTPError as e:
            raise bad_request(
                f"could not fetch the image: {type(e).__name__}", param=param, code="invalid_image"
            ) from None

    async def _read(self, url: str, param: str) -> bytes:
        assert self._client is not None
        async with self._client.stream("GET", url, timeout=self.remote_timeout) as r:
            if r.status_code != 200:
                raise bad_request(
                    f"fetching the image gave HTTP {r.status_code}",
                    param=param,
                    code="invalid_image",
                )
            declared = r.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > self.remote_max_bytes:
                raise self._too_big(param)
            chunks, size = [], 0
            async for chunk in r.aiter_bytes():
                size += len(chunk)
                if size > self.remote_max_bytes:
                    raise self._too_big(param)
                chunks.append(chunk)
            return b"".join(chunks)

    def _too_big(self, param: str) -> APIError:
        return bad_request(
            f"remote image is larger than {self.remote_max_bytes} bytes",
            param=param,
            code="invalid_image",
        )
