"""Image inputs of a request -> small RGB PIL images, under bounded memory and CPU.

Accepted: `data:image/<type>;base64,<data>` URLs; plain base64 (the /v1/point `image`
field); http(s) URLs only when the server runs with --allow-remote-images (see `RemoteImages`).

Decoding (`decode_image`, run by `DecodePool` in its threads):
  * formats: PNG (APNG's first frame), JPEG, WebP and GIF (first frame) only; anything else
    (ICO with an embedded PNG, EPS through Ghostscript, TIFF, ...) is refused unread;
  * width x height is read from the header and checked before any pixel is decoded (WebP's
    from the file's first bytes, since Pillow allocates its canvas while opening);
  * no more resolution is decoded than the model uses: a JPEG is decoded at 1/2, 1/4 or 1/8
    scale (draft mode) and any image is box-reduced while converting to RGB, as long as the
    result still covers the model's canvas and picks the same crop grid (so the prompt's
    image tokens are unchanged). Points keep referring to the original size (`Decoded.size`);
  * all decodes share `DecodePool`'s threads and one budget of pixels in flight, so neither
    the images of one request nor `--max-queue` requests decode more than the budget at once;
  * `load_all` cancels a request's remaining work when one of its images fails or the
    request is cancelled (the client left): queued decodes never start, running ones stop
    at their next step, and their budget returns when their thread is done.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ctypes
import io
import ipaddress
import logging
import os
import re
import socket
import ssl
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
from PIL import Image

from molmo_model.config import PreprocessConfig
from molmo_model.images import ImageError, check_size, to_rgb
from molmo_model.preprocessing import fit_size, select_grid
from server.errors import bad_request

logger = logging.getLogger("server")
T = TypeVar("T")

FORMATS = ("PNG", "JPEG", "WEBP", "GIF")  # what users send; Pillow tries no other plugin
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[^,;]*)*),", re.ASCII)
_B64_JUNK = re.compile(rb"\s+")
# EXIF orientation -> the transpose that shows the stored pixels upright.
_ORIENT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


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


# ---------------------------------------------------------------- decoding


@dataclass
class Decoded:
    image: Image.Image  # RGB, upright; possibly reduced (see the module docstring)
    size: tuple[int, int]  # (width, height) of the image as sent, after EXIF orientation


class Header:
    """An opened, not yet decoded image: its size checked, its decode cost known."""

    def __init__(self, data: bytes, max_pixels: int, geometry: PreprocessConfig | None) -> None:
        webp = _webp_size(data)
        if webp is not None:
            check_size(webp, max_pixels)
        try:
            self.image = Image.open(io.BytesIO(data), formats=FORMATS)
        except Image.UnidentifiedImageError:
            raise ImageError(
                "image data is not a PNG, JPEG, WebP or GIF image (the formats accepted here)"
            ) from None
        except Image.DecompressionBombError as e:
            raise ImageError(f"image is too large to decode safely: {e}") from None
        except Exception as e:  # PIL raises OSError, SyntaxError, struct.error, ...
            raise ImageError(f"image data is corrupt or unreadable: {e}") from None
        width, height = self.image.size
        check_size((width, height), max_pixels)
        self.sent_size = (width, height)  # as stored (before EXIF orientation)
        self.geometry = geometry  # the model's crop geometry; None: never decode reduced
        self.orientation = _orientation(self.image) if self.image.format == "JPEG" else 1
        self.draft = 1
        if self.image.format == "JPEG" and len(self.image.tile) == 1:
            # PNG's EXIF may follow the pixels: only JPEG's orientation is known this early.
            self.draft = self._reduction((width, height), (8, 4, 2))
            if self.draft > 1:
                self.image.draft(self.image.mode, (width // self.draft, height // self.draft))

    @property
    def pixels(self) -> int:
        """Pixels the decode will hold (after draft mode)."""
        width, height = self.image.size
        return width * height

    def decode(self, cancelled: threading.Event) -> Decoded:
        """Decode, convert to RGB (reduced where safe) and turn upright."""
        try:
            self.image.load()
        except Exception as e:
            raise ImageError(f"image data is corrupt or truncated: {e}") from None
        if cancelled.is_set():
            raise asyncio.CancelledError
        if self.image.format != "JPEG":
            self.orientation = _orientation(self.image)
        rgb = to_rgb(self.image, self._reduction(self.image.size, range(8, 1, -1)))
        if rgb is self.image:  # an RGB image kept as it is: a copy frees the file's bytes
            rgb = rgb.copy()
        self.image.close()
        transpose = _ORIENT.get(self.orientation)
        if transpose is not None:
            rgb = rgb.transpose(transpose)
        # The pixels are upright now; an EXIF block kept with them would turn them again
        # wherever the image is read next (the preprocessor applies EXIF orientation).
        for key in ("exif", "XML:com.adobe.xmp", "xmp"):
            rgb.info.pop(key, None)
        return Decoded(rgb, self._upright(self.sent_size))

    def _reduction(self, size: tuple[int, int], factors: Any) -> int:
        """The largest factor in `factors` that shrinks `size` (stored frame) and still
        covers the model's canvas with the crop grid of the image as sent, and whose result
        the preprocessor resizes to the very box (size and place on both views' canvases)
        it gives the image as sent, so that the crops' masks are the same and the pixels
        differ only by the resampling (else 1)."""
        config = self.geometry
        if config is None:
            return 1
        sent_w, sent_h = self._upright(self.sent_size)
        rows, cols = select_grid(sent_w, sent_h, config)
        need_h, need_w = config.canvas_size(rows, cols)
        canvases = (config.canvas_size(1, 1), (need_h, need_w))
        boxes = [fit_size(sent_h, sent_w, *c) for c in canvases]
        for f in factors:
            w, h = self._upright((-(-size[0] // f), -(-size[1] // f)))
            if (
                w >= need_w
                and h >= need_h
                and select_grid(w, h, config) == (rows, cols)
                and [fit_size(h, w, *c) for c in canvases] == boxes
            ):
                return f
        return 1

    def _upright(self, size: tuple[int, int]) -> tuple[int, int]:
        return (size[1], size[0]) if self.orientation in (5, 6, 7, 8) else size


def decode_image(data: bytes, max_pixels: int, geometry: PreprocessConfig | None = None) -> Decoded:
    """Header check and decode in one call (what `DecodePool` does in two steps)."""
    return Header(data, max_pixels, geometry or PreprocessConfig()).decode(threading.Event())


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """The canvas size in a WebP file's first chunk (RIFF container, Google's WebP spec)."""
    if len(data) < 30 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    chunk = data[12:16]
    if chunk == b"VP8X":  # 24-bit width-1, height-1
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8 ":  # key frame: 14-bit width and height after the start code
        return (
            int.from_bytes(data[26:28], "little") & 0x3FFF,
            int.from_bytes(data[28:30], "little") & 0x3FFF,
        )
    if chunk == b"VP8L":  # 14-bit width-1 and height-1 after the signature byte
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(0x0112, 1)  # 0x0112: Orientation
    except Exception:  # a malformed EXIF block keeps the image as stored
        return 1
    return value if value in _ORIENT else 1


def return_freed_images_to_the_os(threshold: int = 1 << 20) -> bool:
    """Make glibc serve allocations of `threshold` bytes and more with mmap, so an image's
    memory goes back to the OS when it is freed. By default glibc raises that threshold to
    the largest block freed so far (up to 32 MB), after which Pillow's 16 MB blocks come
    from per-thread heaps that keep them: each decode thread would hold on to the largest
    image it has decoded. False where this is not glibc."""
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(-3, threshold))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


class DecodePool:
    """Threads that decode images, under one budget of pixels in flight.

    A decode waits until its pixels fit in the budget (an image bigger than the budget
    waits until it runs alone). Its pixels return to the budget when its thread is done,
    even when the request that asked for it has gone.
    """

    def __init__(self, workers: int, pixel_budget: int) -> None:
        self.pixel_budget = pixel_budget
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="image-decode")
        self._in_flight = 0
        self._changed: asyncio.Condition | None = None

    @property
    def pixels_in_flight(self) -> int:
        return self._in_flight

    async def run(self, fn: Callable[[], T], pixels: int = 0) -> T:
        """`fn()` in a pool thread once `pixels` fit in the budget."""
        loop = asyncio.get_running_loop()
        if self._changed is None:
            self._changed = asyncio.Condition()
        cost = min(pixels, self.pixel_budget)
        async with self._changed:
            await self._changed.wait_for(lambda: self._in_flight + cost <= self.pixel_budget)
            self._in_flight += cost
        future = self._executor.submit(fn)

        def done(_: object) -> None:
            try:
                loop.call_soon_threadsafe(self._release, cost)
            except RuntimeError:  # the loop has closed: nobody is waiting on the budget
                self._in_flight -= cost

        future.add_done_callback(done)
        return await asyncio.wrap_future(future)  # cancelling it cancels a queued job

    def _release(self, cost: int) -> None:
        self._in_flight -= cost

        async def notify() -> None:
            assert self._changed is not None
            async with self._changed:
                self._changed.notify_all()

        if cost:
            asyncio.ensure_future(notify())

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------- the fetcher


class ImageFetcher:
    """Turns the image references of a request into images, within the server's limits."""

    def __init__(
        self,
        max_pixels: int,
        allow_remote: bool = False,
        geometry: PreprocessConfig | None = None,
        pool: DecodePool | None = None,
        remote: RemoteImages | None = None,
        reduce: bool = True,
    ) -> None:
        self.max_pixels = max_pixels
        # reduce=False (Molmo 2): images are decoded at full size (no draft / reduce).
        self.geometry = (geometry or PreprocessConfig()) if reduce else None
        self.allow_remote = allow_remote
        self.pool = pool or DecodePool(min(4, os.cpu_count() or 1), max_pixels)
        self.remote = remote or RemoteImages()

    async def aclose(self) -> None:
        self.pool.shutdown()

    async def fetch_bytes(self, ref: str, param: str, bare_base64: bool = False) -> bytes:
        ref = ref.strip()
        if ref[:5].lower() == "data:":
            if len(ref) < 100_000:
                return split_data_url(ref, param)
            return await self.pool.run(lambda: split_data_url(ref, param))
        if ref[:7].lower() == "http://" or ref[:8].lower() == "https://":
            if not self.allow_remote:
                raise bad_request(
                    "remote image URLs are disabled on this server; send a data: URL "
                    "(start the server with --allow-remote-images to allow them)",
                    param=param,
                    code="invalid_image",
                )
            return await self.remote.fetch(ref, param)
        if bare_base64:
            if len(ref) < 100_000:
                return decode_base64(ref, param)
            return await self.pool.run(lambda: decode_base64(ref, param))
        raise bad_request(
            "image_url must be a data: URL" + (" or an http(s) URL" if self.allow_remote else ""),
            param=param,
            code="invalid_image",
        )

    async def load(self, ref: str, param: str, bare_base64: bool = False) -> Decoded:
        """Fetch and decode one image (header, then pixels, in the pool's threads)."""
        data = await self.fetch_bytes(ref, param, bare_base64)
        cancelled = threading.Event()
        try:
            header = await self.pool.run(lambda: Header(data, self.max_pixels, self.geometry))
            return await self.pool.run(lambda: header.decode(cancelled), header.pixels)
        except ImageError as e:
            raise bad_request(str(e), param=param, code="invalid_image") from None
        except asyncio.CancelledError:
            cancelled.set()  # a running decode stops at its next step
            raise

    async def load_all(
        self, refs: list[tuple[str, str]], bare_base64: bool = False
    ) -> list[Decoded]:
        """All images of a request; the first failure cancels the others and is raised."""
        tasks = [asyncio.ensure_future(self.load(r, p, bare_base64)) for r, p in refs]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in tasks:
                if task.done() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            return [task.result() for task in tasks]
        finally:
            for task in tasks:
                task.cancel()


# ---------------------------------------------------------------- remote images


class _Refused(Exception):
    """A remote image the fetcher will not use (the reason is logged, never sent)."""


@dataclass
class RemoteImages:
    """Fetches http(s) images without letting a client reach what it should not.

    Only hosts in `allowed_domains` (exact names; None: any) on `ports`; the host is
    resolved once and every address must be globally routable (unless `allow_private`);
    the connection goes to the checked address (Host header and TLS name kept), each
    redirect is checked the same way, the body is read raw (identity encoding only) up to
    `max_bytes`, no cookies are kept. Every failure is the same 400, so that the answers
    cannot map the network behind the server.
    """

    timeout: float = 10.0
    max_bytes: int = 20 * 1024 * 1024
    allowed_domains: tuple[str, ...] | None = None
    allow_private: bool = False
    ports: tuple[int, ...] = (80, 443)
    max_redirects: int = 3
    _ssl: ssl.SSLContext | None = field(default=None, repr=False)

    async def fetch(self, url: str, param: str) -> bytes:
        try:
            async with asyncio.timeout(self.timeout):
                return await self._follow(url)
        except Exception as e:  # one answer for every way a fetch fails (not cancellation)
            logger.info("remote image refused: %s: %s", type(e).__name__, e)
            raise bad_request(
                f"could not fetch the image at {param}: remote images must be http(s) URLs of "
                "a public host this server allows, on its allowed ports, answering 200 with at "
                f"most {self.max_bytes} bytes within {self.timeout:g} s",
                param=param,
                code="invalid_image",
            ) from None

    async def _follow(self, url: str) -> bytes:
        if self._ssl is None:  # built once: loading the CA bundle costs ~20 ms
            self._ssl = ssl.create_default_context()
        # A client per fetch: no cookie, connection or credential outlives it.
        async with httpx.AsyncClient(
            trust_env=False, follow_redirects=False, verify=self._ssl
        ) as client:
            for _ in range(self.max_redirects + 1):
                target = httpx.URL(url)
                request = await self._pinned(target)
                response = await client.send(request, stream=True)
                try:
                    if response.is_redirect:
                        url = str(target.join(response.headers["location"]))
                        continue
                    return await self._body(response)
                finally:
                    await response.aclose()
        raise _Refused("too many redirects")

    async def _pinned(self, url: httpx.URL) -> httpx.Request:
        if url.scheme not in ("http", "https"):
            raise _Refused(f"scheme {url.scheme!r}")
        host = url.raw_host.decode("ascii").lower().rstrip(".")
        if not host:
            raise _Refused("no host")
        if self.allowed_domains is not None and host not in self.allowed_domains:
            raise _Refused(f"host {host!r} not allowed")
        port = url.port or (443 if url.scheme == "https" else 80)
        if port not in self.ports:
            raise _Refused(f"port {port}")
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
        addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
        if not addresses:
            raise _Refused("no address")
        if not self.allow_private and not all(_is_public(a) for a in addresses):
            raise _Refused(f"{host} resolves to a non-public address")
        ip = str(addresses[0])
        headers = {
            "Host": url.netloc.decode("ascii"),
            "Accept": "image/*",
            "Accept-Encoding": "identity",
            "User-Agent": "molmo-serve",
        }
        extensions: dict[str, Any] = {
            "timeout": {"connect": self.timeout, "read": self.timeout, "write": self.timeout,
                        "pool": self.timeout},
        }  # fmt: skip
        if url.scheme == "https":
            extensions["sni_hostname"] = host  # the certificate is checked against the name
        return httpx.Request("GET", url.copy_with(host=ip), headers=headers, extensions=extensions)

    async def _body(self, response: httpx.Response) -> bytes:
        if response.status_code != 200:
            raise _Refused(f"HTTP {response.status_code}")
        if response.headers.get("content-encoding", "identity").strip().lower() not in (
            "identity",
            "",
        ):
            raise _Refused("content-encoding")
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise _Refused("too large")
        chunks, size = [], 0
        async for chunk in response.aiter_raw():
            size += len(chunk)
            if size > self.max_bytes:
                raise _Refused("too large")
            chunks.append(chunk)
        return b"".join(chunks)


def _is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast
