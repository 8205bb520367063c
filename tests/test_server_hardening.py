"""Server hardening (issue 19): bad and adversarial inputs cost bounded memory and CPU, never
a 5xx, and leave the server serving.

In process (no engine): image decoding (format allow-list, header checks, reduced decodes
that keep the crop grid, the pixel budget and cancellation), remote images (address, port,
domain and redirect checks, one message), strict request types.

Against the real server (`python -m server`, tiny checkpoint, vLLM engine), one per module:
  * the worst accepted requests (images at the pixel limit: RGBA, 16-bit, JPEG, GIF, two at
    once): the server process's peak RSS (VmHWM, reset through /proc/PID/clear_refs) grows
    at most 300 MB above idle;
  * a corpus of bad inputs, generated here (bombs, odd formats, SSRF targets on loopback,
    strict-type and unsupported-parameter bodies, malformed HTTP, slow uploads, disconnects,
    a stalled stream reader): no 5xx, every error OpenAI-shaped, the server answering
    afterwards, its in-flight gauges back to 0;
  * last, the engine dies (its core process is killed): the server exits with status 1.

    pytest tests/test_server_hardening.py -q
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import signal
import socket
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from helpers import Server, assert_openai_error, data_url, encode_image, image_part, running_server
from PIL import Image

from molmo_model.config import PreprocessConfig
from molmo_model.images import ImageError, load_image
from molmo_model.preprocessing import MolmoPreprocessor, image_token_count, select_grid
from molmo_model.tokenizer import MolmoTokenizer
from server.app import create_app
from server.config import ServerConfig
from server.errors import APIError
from server.images import DecodePool, ImageFetcher, RemoteImages, decode_image
from server.protocol import ChatCompletionRequest, ChatMessage

KEY = "hardening-key"
MAX_PIXELS = 20_000_000  # the test server's --max-image-pixels
LIMIT_SIZE = (5000, 4000)  # an image exactly at it
MAX_BODY = 4_000_000
RSS_GROWTH_LIMIT = 300 * 2**20


# ---------------------------------------------------------------- crafted files


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int, depth: int = 8, colour: int = 2) -> bytes:
    """A PNG whose header says width x height, with a few real bytes of pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _chunk(b"IEND", b"")
    )


def png_bomb(width: int, height: int) -> bytes:
    """A real grey PNG of zeros: a few KB that decode to width x height bytes."""
    raw = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + pixels
    data = b"".join(raw.compress(row) for _ in range(height)) + raw.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")
    )


def ico_holding(png: bytes) -> bytes:
    """An .ico whose one entry is `png` (Pillow decodes such a PNG while opening the file)."""
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 6 + 16)
    return header + entry + png


def jpeg_claiming(width: int, height: int) -> bytes:
    raw = bytearray(encode_image(Image.new("RGB", (16, 16), "red"), "JPEG"))
    sof = raw.index(b"\xff\xc0")
    raw[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(raw)


def gif_claiming(width: int, height: int) -> bytes:
    raw = bytearray(encode_image(Image.new("P", (8, 8)), "GIF"))
    raw[6:10] = struct.pack("<HH", width, height)
    return bytes(raw)


def webp_claiming(width: int, height: int) -> bytes:
    raw = bytearray(encode_image(Image.new("RGB", (16, 16), "red"), "WEBP"))
    assert raw[12:16] == b"VP8 "
    raw[26:30] = struct.pack("<HH", width, height)
    return bytes(raw)


def other_formats() -> dict[str, bytes]:
    """Images in formats Pillow reads and the server refuses."""
    small = Image.new("RGB", (32, 32), "blue")
    out = {fmt: encode_image(small, fmt) for fmt in ("BMP", "TIFF", "ICO", "PPM", "TGA", "PCX")}
    out |= {fmt: encode_image(small, fmt) for fmt in ("SGI", "DDS", "QOI")}
    out["EPS"] = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    out["PDF"] = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF"
    out["SVG"] = b'<svg xmlns="http://www.w3.org/2000/svg" width="9000" height="9000"/>'
    out["XBM"] = b"#define a_width 8\n#define a_height 8\nstatic char a_bits[]={0,0,0,0,0,0,0,0};"
    return out


def at_limit() -> dict[str, list[bytes]]:
    """Accepted requests that cost the most to decode: images at the pixel limit."""
    w, h = LIMIT_SIZE
    grey16 = Image.fromarray(np.full((h, w), 40_000, dtype=np.uint16))
    return {
        "rgba png": [encode_image(Image.new("RGBA", LIMIT_SIZE, (255, 0, 0, 128)), "PNG")],
        "16-bit png": [encode_image(grey16, "PNG")],
        "jpeg": [encode_image(Image.new("RGB", LIMIT_SIZE, "green"), "JPEG")],
        "gif": [encode_image(Image.new("P", LIMIT_SIZE), "GIF")],
        "two rgb png": [encode_image(Image.new("RGB", LIMIT_SIZE, "blue"), "PNG")] * 2,
    }


# ---------------------------------------------------------------- decoding, in process


def test_only_png_jpeg_webp_gif_are_decoded() -> None:
    for raw in other_formats().values():
        with pytest.raises(ImageError, match="PNG, JPEG, WebP or GIF"):
            decode_image(raw, MAX_PIXELS)
    for fmt in ("PNG", "JPEG", "WEBP", "GIF"):
        assert decode_image(encode_image(Image.new("RGB", (30, 20)), fmt), MAX_PIXELS).size == (
            30,
            20,
        ), fmt


def test_sizes_are_checked_from_the_header_before_decoding() -> None:
    # An ICO holding a 10000 x 10000 PNG: refused unread (Pillow would decode it to open it).
    with pytest.raises(ImageError, match="formats accepted"):
        decode_image(ico_holding(png_bomb(10_000, 10_000)), MAX_PIXELS)
    for raw in (
        png_claiming(50_000, 50_000),
        png_claiming(1, MAX_PIXELS + 1),
        jpeg_claiming(10_000, 10_000),
        jpeg_claiming(65_000, 65_000),
        gif_claiming(65_535, 65_535),
        webp_claiming(16_000, 16_000),
    ):
        with pytest.raises(ImageError, match="over the limit|too large"):
            decode_image(raw, MAX_PIXELS)
    with pytest.raises(ImageError, match="zero size|formats accepted"):  # Pillow: not a PNG
        decode_image(png_claiming(0, 10), MAX_PIXELS)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", [None, 6])
def test_large_images_decode_reduced_with_the_same_crop_grid(fmt: str, orientation) -> None:
    image = Image.new("RGB", (6000, 4000), "red")
    decoded = decode_image(encode_image(image, fmt, orientation=orientation), MAX_PIXELS * 2)
    sent = (4000, 6000) if orientation == 6 else (6000, 4000)
    assert decoded.size == sent  # points refer to the image as sent
    w, h = decoded.image.size
    assert w * h * 4 <= sent[0] * sent[1]  # at least halved on each side
    assert (w > h) == (sent[0] > sent[1])
    config = PreprocessConfig()
    assert select_grid(w, h, config) == select_grid(*sent, config)
    assert image_token_count(w, h) == image_token_count(*sent)
    assert decoded.image.mode == "RGB" and decoded.image.getpixel((w // 2, h // 2))[0] > 200


@pytest.mark.parametrize(
    ("size", "fmt"),
    [((4000, 3000), "PNG"), ((3000, 4000), "PNG"), ((4001, 2999), "JPEG"), ((5000, 1700), "PNG"),
     ((2600, 2000), "GIF"), ((4000, 3000), "JPEG")],
)  # fmt: skip
def test_a_reduced_decode_gives_the_crops_of_the_full_one(
    size: tuple[int, int], fmt: str, tok: MolmoTokenizer
) -> None:
    """What the default (exact) path computes from a reduced decode: the same tokens and
    image masks as from the image as sent (Ai2's preprocessing), and pixels that differ only
    by resampling. A reduction whose resize lands one pixel off (4000x3000 by 3 -> 1334x1000)
    would shift the image against its masks: refused."""
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    rng = np.random.default_rng(0)
    pixels = np.stack([128 + 90 * np.sin(x / (31 + 9 * c)) * np.cos(y / 47) for c in range(3)], -1)
    pixels += rng.normal(0, 10, pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    raw = encode_image(image, fmt)
    decoded = decode_image(raw, 64_000_000)
    pre = MolmoPreprocessor(PreprocessConfig(), tok)
    full = pre.preprocess(Image.open(io.BytesIO(raw)).convert("RGB"))
    reduced = pre.preprocess(decoded.image)
    assert reduced.tokens == full.tokens
    assert torch.equal(reduced.image_masks, full.image_masks)
    diff = (reduced.images - full.images).abs()  # CLIP-normalised: a range of about 3.7
    print(f"{fmt} {size} decoded as {decoded.image.size}: mean |diff| {diff.mean():.4f}, max {diff.max():.4f}")
    if decoded.image.size == size:  # no reduction lands on the same box: decoded whole
        assert diff.max() == 0
    else:  # the resampling differs (noisy pixels: about one grey level on average)
        assert diff.mean() <= 0.02 and diff.max() <= 0.3, (diff.mean(), diff.max())


@pytest.mark.parametrize("size", [(300, 200), (3000, 2000)])  # decoded as it is, and reduced
def test_upright_images_are_not_turned_again_downstream(size: tuple[int, int]) -> None:
    # The preprocessor applies EXIF orientation to what it is given: a decoded image that
    # kept its EXIF block would be turned a second time, and the model would see it sideways.
    image = Image.new("RGB", size, "white")
    image.paste((255, 0, 0), (0, 0, size[0] // 6, size[1] // 4))  # red in the top-left corner
    raw = encode_image(image.transpose(Image.Transpose.ROTATE_90), "JPEG", orientation=6)
    decoded = decode_image(raw, MAX_PIXELS * 2)
    seen = load_image(decoded.image)
    assert decoded.size == size and seen.size == decoded.image.size
    assert seen.getpixel((2, 2))[1] < 50 and seen.getpixel((seen.width - 3, 2)) == (255, 255, 255)


def test_small_and_odd_modes_decode_as_before() -> None:
    for image in (
        Image.new("RGBA", (40, 30), (0, 0, 0, 0)),  # transparent: white
        Image.fromarray(np.full((30, 40), 65535, dtype=np.uint16)),  # 16-bit white
        Image.new("LA", (40, 30), (0, 0)),
    ):
        decoded = decode_image(encode_image(image, "PNG"), MAX_PIXELS)
        assert decoded.size == (40, 30) and decoded.image.getpixel((5, 5)) == (255, 255, 255)


def test_a_failing_image_cancels_the_rest_and_the_budget_returns() -> None:
    pool = DecodePool(workers=1, pixel_budget=1)  # one decode at a time
    fetcher = ImageFetcher(max_pixels=MAX_PIXELS, pool=pool)
    big = data_url(encode_image(Image.new("RGBA", LIMIT_SIZE, (0, 0, 0, 9)), "PNG"))
    refs = [(big, f"image{i}") for i in range(4)] + [(data_url(b"junk"), "bad")]

    async def go():
        with pytest.raises(APIError) as e:
            await fetcher.load_all(refs)
        assert e.value.param == "bad" and e.value.status == 400
        deadline = time.monotonic() + 60
        while pool.pixels_in_flight:  # the decode already running finishes, nothing else
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        return await fetcher.load(data_url(encode_image(Image.new("RGB", (8, 8)))), "ok")

    assert asyncio.run(go()).size == (8, 8)


# ---------------------------------------------------------------- remote images, in process


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        port = self.server.server_address[1]
        redirects = {
            "/to-other-host": f"http://localhost:{port}/ok.png",
            "/to-other-port": "http://127.0.0.1:1/ok.png",
            "/to-metadata": "http://169.254.169.254/latest/meta-data/",
            "/to-ok": "/ok.png",
            "/loop": "/loop",
        }
        if self.path in redirects:
            self.send_response(302)
            self.send_header("Location", redirects[self.path])
            self.send_header("Set-Cookie", "session=1")
            self.end_headers()
            return
        body = encode_image(Image.new("RGB", (64, 32)))
        if self.path == "/gzip.png":
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
        elif self.path == "/ok.png" and "Cookie" in self.headers:
            self.send_response(403)  # a cookie from an earlier response came back
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_remote_images_reach_only_checked_addresses() -> None:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    base = f"http://127.0.0.1:{port}"
    # This test's server only: 127.0.0.1 by name, loopback addresses, its port.
    opened = RemoteImages(
        timeout=5, allowed_domains=("127.0.0.1",), allow_private=True, ports=(port,)
    )
    closed = RemoteImages(timeout=5)  # the defaults: public hosts on 80/443

    async def fetch(remote: RemoteImages, url: str) -> bytes | str:
        try:
            return await remote.fetch(url, "u")
        except APIError as e:
            assert e.status == 400 and e.code == "invalid_image" and e.param == "u"
            return e.message

    async def go():
        ok = [await fetch(opened, f"{base}{p}") for p in ("/ok.png", "/to-ok")]
        refused = [
            await fetch(opened, f"{base}{p}")
            for p in ("/to-other-host", "/to-other-port", "/to-metadata", "/loop", "/gzip.png")
        ]
        refused += [
            await fetch(closed, url)
            for url in (
                f"{base}/ok.png",
                "http://127.0.0.1/ok.png",
                f"http://localhost:{port}/ok.png",
                f"http://[::1]:{port}/ok.png",
                "http://169.254.169.254/latest/meta-data/",
                "http://2130706433/",
                "http://127.0.0.1:99999/",
                "http://[::1/",
                "ftp://example.com/a.png",
            )
        ]
        return ok, refused

    try:
        ok, refused = asyncio.run(go())
    finally:
        httpd.shutdown()
    assert all(isinstance(b, bytes) and b.startswith(b"\x89PNG") for b in ok), ok
    assert all(isinstance(m, str) for m in refused), refused
    # One message per fetcher, whatever failed where.
    assert len(set(refused[:5])) == 1 and len(set(refused[5:])) == 1, refused


# ---------------------------------------------------------------- request types, in process


def test_strict_types_and_unsupported_parameters_are_400(tiny_checkpoint: Path) -> None:
    app = create_app(ServerConfig(model=str(tiny_checkpoint)), engine_factory=None)
    hi = [{"role": "user", "content": "hi"}]
    cases = [
        ({"messages": hi, "n": "2"}, "n"),
        ({"messages": hi, "stream": "yes"}, "stream"),
        ({"messages": hi, "max_tokens": "5"}, "max_tokens"),
        ({"messages": hi, "temperature": "0.5"}, "temperature"),
        ({"messages": hi, "logprobs": 1}, "logprobs"),
        ({"messages": hi, "response_format": {"type": "json_schema", "json_schema": {
            "name": "p", "schema": {"type": "objekt"}}}}, "response_format"),
        ({"messages": hi, "structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"messages": hi, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"messages": hi, "tool_choice": "auto"}, "tool_choice"),
        ({"messages": hi, "logit_bias": {"hello": 1}}, "logit_bias"),
        ({"messages": hi, "logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"messages": hi, "stop": "x" * 257}, "stop"),
    ]

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            out = [(await c.post("/v1/chat/completions", json=b), p) for b, p in cases]
            out.append((await c.post("/v1/point", json={"image": "x", "object": " \t"}), "object"))
            return out

    for r, param in asyncio.run(go()):
        err = assert_openai_error(r, 400, param=param)
        assert param.split(".")[0] in err["message"], err
    # logit_bias itself is vLLM's: token ids (as strings) -> bias.
    messages = [ChatMessage(role="user", content="hi")]
    biased = ChatCompletionRequest(messages=messages, logit_bias={"5": 3, "7": -100})
    assert biased.to_sampling_params(4, stream=False).logit_bias == {5: 3.0, 7: -100.0}


# ---------------------------------------------------------------- the real server

SERVER_FLAGS = (
    "--api-key", KEY, "--enforce-eager", "--max-model-len", "3072", "--max-num-seqs", "8",
    "--max-images", "2", "--max-image-pixels", str(MAX_PIXELS), "--max-body-bytes",
    str(MAX_BODY), "--header-read-timeout", "2", "--body-read-timeout", "2",
    "--allow-remote-images",
)  # fmt: skip
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory):
    with running_server(tiny_checkpoint, tmp_path_factory.mktemp("hard"), *SERVER_FLAGS) as s:
        yield s


def chat_body(*images: bytes, text: str = "What is this?", **extra) -> dict:
    content = [image_part(raw) for raw in images] + [{"type": "text", "text": text}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


def metrics_of(server: Server) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{server.url}/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def settle(server: Server, timeout: float = 120) -> dict[str, float]:
    """Waits until nothing is in flight (our gauges and vLLM's); returns the metrics."""
    gauges = ("molmo_requests_running", "molmo_requests_waiting", "molmo_engine_unfinished")
    deadline = time.monotonic() + timeout
    while True:
        m = metrics_of(server)
        busy = {k: v for k, v in m.items() if k.startswith(gauges) and v}
        busy |= {k: v for k, v in m.items() if k.startswith("vllm:num_requests_") and v}
        if not busy:
            return m
        assert time.monotonic() < deadline, f"still in flight: {busy}"
        time.sleep(0.2)


def server_errors(m: dict[str, float]) -> dict[str, float]:
    """5xx answers to API requests (/health's 503s while the engine loaded are expected)."""
    return {
        k: v for k, v in m.items() if re.match(r'molmo_requests_total{route="/v1/.*status="5', k)
    }


def rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of `pid` in bytes."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return tuple(int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM"))  # type: ignore[return-value]


@pytest.mark.vllm
@pytest.mark.server
def test_worst_accepted_requests_stay_within_300_mb(server: Server) -> None:
    pid = server.proc.pid
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=300) as c:
        warm = c.post(
            "/v1/chat/completions", json=chat_body(encode_image(Image.new("RGB", (64, 64))))
        )
        assert warm.status_code == 200, warm.text
        growth = {}
        for name, images in at_limit().items():
            settle(server)
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
            idle, _ = rss(pid)
            r = c.post("/v1/chat/completions", json=chat_body(*images))
            assert r.status_code == 200, (name, r.text)
            growth[name] = rss(pid)[1] - idle
    print("peak RSS growth above idle (MB):", {k: round(v / 2**20) for k, v in growth.items()})
    assert max(growth.values()) <= RSS_GROWTH_LIMIT, growth


def bad_json_bodies() -> list[tuple[str, dict]]:
    """(name, body) of chat requests the server must refuse with a 4xx."""
    hi = [{"role": "user", "content": "hi"}]
    img = encode_image(Image.new("RGB", (40, 30), "red"))
    bodies = {
        "n string": {"messages": hi, "n": "2"},
        "stream string": {"messages": hi, "stream": "yes"},
        "max_tokens string": {"messages": hi, "max_tokens": "5"},
        "max_tokens 0": {"messages": hi, "max_tokens": 0},
        "max_tokens negative": {"messages": hi, "max_tokens": -1},
        "max_tokens huge": {"messages": hi, "max_tokens": 2**70},
        "temperature string": {"messages": hi, "temperature": "hot"},
        "temperature 3": {"messages": hi, "temperature": 3},
        "top_p 0": {"messages": hi, "top_p": 0},
        "n 0": {"messages": hi, "n": 0},
        "n 1000": {"messages": hi, "n": 1000},
        "n greedy": {"messages": hi, "n": 2, "temperature": 0},
        "logprobs string": {"messages": hi, "logprobs": "true"},
        "top_logprobs 50": {"messages": hi, "logprobs": True, "top_logprobs": 50},
        "top_logprobs float": {"messages": hi, "logprobs": True, "top_logprobs": 1.5},
        "seed string": {"messages": hi, "seed": "1"},
        "messages string": {"messages": "hi"},
        "messages empty": {"messages": []},
        "messages missing": {"model": "tiny"},
        "role tool": {"messages": [{"role": "tool", "content": "x"}]},
        "content number": {"messages": [{"role": "user", "content": 5}]},
        "part unknown": {"messages": [{"role": "user", "content": [{"type": "audio"}]}]},
        "stop number": {"messages": hi, "stop": 5},
        "stop five": {"messages": hi, "stop": ["a", "b", "c", "d", "e"]},
        "stop empty": {"messages": hi, "stop": [""]},
        "stop long": {"messages": hi, "stop": "x" * 10_000},
        "stream_options alone": {"messages": hi, "stream_options": {"include_usage": True}},
        "response_format xml": {"messages": hi, "response_format": {"type": "xml"}},
        "structured_outputs two": {"messages": hi, "structured_outputs": {"regex": "a", "choice": ["b"]}},
        "structured_outputs bad regex": {"messages": hi, "structured_outputs": {"regex": "a(+"}},
        "response_format schema": {
            "messages": hi,
            "response_format": {"type": "json_schema", "json_schema": {"name": "p"}},
        },
        "tools": {"messages": hi, "tools": [{"type": "function", "function": {"name": "f"}}]},
        "tool_choice": {"messages": hi, "tool_choice": "required"},
        "functions": {"messages": hi, "functions": [{"name": "f"}]},
        "logit_bias word": {"messages": hi, "logit_bias": {"hello": 5}},
        "logit_bias range": {"messages": hi, "logit_bias": {"3": 1e9}},
        "logit_bias unknown id": {"messages": hi, "logit_bias": {"999999": 1}},
        "model unknown": {"messages": hi, "model": "gpt-4"},
        "model number": {"messages": hi, "model": 4},
        "long text": {"messages": [{"role": "user", "content": "dog " * 800_000}]},
        "long text many turns": {
            "messages": [{"role": "user", "content": "x" * 100_000}] * 30,
        },
        "too many images": chat_body(img, img, img),
        "image and long text": chat_body(img, text="word " * 3000),
        "detail bad": {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url(img), "detail": "max"}}
                    ],
                }
            ]
        },  # fmt: skip
    }
    return list(bodies.items())


def bad_images() -> list[tuple[str, bytes]]:
    w, h = LIMIT_SIZE
    return [
        ("not an image", b"definitely not an image"),
        ("empty-ish", b"\0"),
        ("png truncated", encode_image(Image.new("RGB", (200, 100), "red"))[:60]),
        ("jpeg truncated", encode_image(Image.new("RGB", (200, 100), "red"), "JPEG")[:200]),
        ("gif broken", b"GIF89a broken"),
        ("webp truncated", encode_image(Image.new("RGB", (200, 100)), "WEBP")[:40]),
        ("png header bomb", png_claiming(50_000, 50_000)),
        ("png one pixel over", png_claiming(w, h + 1)),
        ("png thin bomb", png_claiming(1, 2**31 - 1)),
        ("png zero size", png_claiming(0, 0)),
        ("png 16-bit header bomb", png_claiming(30_000, 30_000, depth=16, colour=6)),
        ("png real bomb", png_bomb(8000, 8000)),
        ("ico with png bomb", ico_holding(png_bomb(8000, 8000))),
        ("jpeg header bomb", jpeg_claiming(10_000, 10_000)),
        ("jpeg huge header", jpeg_claiming(65_000, 65_000)),
        ("gif screen bomb", gif_claiming(65_535, 65_535)),
        ("webp canvas bomb", webp_claiming(16_000, 16_000)),
        *((f"format {fmt}", raw) for fmt, raw in other_formats().items()),
    ]


def bad_urls(server: Server) -> list[tuple[str, str]]:
    """SSRF targets (and broken URLs): remote images are on, private addresses are not."""
    port = server.url.rsplit(":", 1)[1]
    return [
        (f"ssrf {u}", u)
        for u in (
            f"http://127.0.0.1:{port}/metrics",
            f"http://127.0.0.1:{port}/health",
            "http://127.0.0.1/",
            "https://127.0.0.1/",
            "http://localhost/",
            "http://LOCALHOST./",
            f"http://localhost:{port}/metrics",
            f"http://[::1]:{port}/health",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://0.0.0.0/",
            f"http://0.0.0.0:{port}/health",
            "http://127.1/",
            "http://2130706433/",
            "http://0x7f000001/",
            "http://017700000001/",
            "http://169.254.169.254/latest/meta-data/",
            "http://[fd00:ec2::254]/latest/meta-data/",
            "http://metadata.google.internal/computeMetadata/v1/",
            "http://10.0.0.1/",
            "http://172.16.0.1/",
            "http://192.168.0.1/",
            "http://100.64.0.1/",
            "http://[fe80::1]/",
            "http://224.0.0.1/",
            "http://user:pass@127.0.0.1/",
            "http://example.com:22/",
            "http://example.com:6379/",
            "http://127.0.0.1:99999/",
            "http://[::1/",
            "http://a b/",
            "http:///nohost",
            "http://" + "a" * 300 + ".com/",
            "https://xn--/",
        )
    ] + [
        (f"not http {u}", u)
        for u in ("file:///etc/passwd", "ftp://example.com/a.png", "gopher://127.0.0.1:6379/_",
                  "javascript:alert(1)", "/etc/passwd", "", "data:", "data:text/plain;base64,aGk=",
                  "data:image/png,raw", "data:image/png;base64,@@@@")
    ]  # fmt: skip


def raw_http(server: Server) -> list[tuple[str, bytes]]:
    """Malformed or unusual HTTP requests, sent as bytes."""
    host = server.url.removeprefix("http://")
    auth = f"Authorization: Bearer {KEY}\r\n"

    def post(headers: str, body: bytes = b"") -> bytes:
        return (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n"
        ).encode() + body

    ok_body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    return [
        # Broken framing: uvicorn's parser answers before the app runs (server/connections.py
        # gives that 400 the API's shape).
        ("framing content-length text", post(auth + "Content-Length: abc\r\n", ok_body)),
        ("framing two lengths", post(auth + "Content-Length: 2\r\nContent-Length: 3\r\n", b"{}")),
        ("content-length over", post(auth + f"Content-Length: {MAX_BODY + 1}\r\n", b"{")),
        ("no auth", post("Content-Length: 2\r\n", b"{}")),
        ("bearer empty", post("Authorization: Bearer\r\nContent-Length: 2\r\n", b"{}")),
        ("basic auth", post("Authorization: Basic a2V5\r\nContent-Length: 2\r\n", b"{}")),
        ("json deep", post(auth + "Content-Length: 100000\r\n", b"[" * 100_000)),
        ("json objects deep", post(auth + "Content-Length: 60001\r\n", b'{"a":' * 12_000 + b"1")),
        ("not utf-8", post(auth + "Content-Length: 4\r\n", b"\xff\xfe\xfd\xfc")),
        ("json null", post(auth + "Content-Length: 4\r\n", b"null")),
        ("json array", post(auth + "Content-Length: 2\r\n", b"[]")),
        ("nan", post(auth + "Content-Length: 38\r\n", b'{"messages": [], "temperature": NaN }')),
        ("form body", post(auth + "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 3\r\n", b"a=b")),
        ("chunked over limit", post(auth + "Transfer-Encoding: chunked\r\n",
                                    b"".join(b"%x\r\n%s\r\n" % (60_000, b"x" * 60_000) for _ in range(70)) + b"0\r\n\r\n")),
        ("get chat", f"GET /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n{auth}\r\n".encode()),
        ("unknown route", f"GET /admin HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()),
        ("put point", f"PUT /v1/point HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Length: 2\r\n\r\n{{}}".encode()),
    ]  # fmt: skip


def send_raw(server: Server, data: bytes, read: bool = True, timeout: float = 60) -> bytes:
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(data)
        if not read:
            return b""
        out = b""
        while b"\r\n\r\n" not in out or not _complete(out):
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
        return out


def _complete(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    m = re.search(rb"content-length: (\d+)", head, re.IGNORECASE)
    return m is not None and len(body) >= int(m.group(1))


def parse_raw(response: bytes) -> httpx.Response:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    headers = [tuple(h.decode().split(": ", 1)) for h in head.split(b"\r\n")[1:] if b": " in h]
    return httpx.Response(status, headers=headers, content=body)


@pytest.mark.vllm
@pytest.mark.server
def test_corpus_of_bad_inputs(server: Server) -> None:
    statuses: dict[str, int] = {}
    failures: list[str] = []
    ssrf_messages: set[str] = set()

    def check(name: str, r: httpx.Response) -> None:
        statuses[name] = r.status_code
        if r.status_code >= 500:
            failures.append(f"{name}: {r.status_code} {r.text[:200]}")
            return
        try:
            err = assert_openai_error(r, r.status_code)
        except (AssertionError, ValueError, KeyError) as e:
            failures.append(f"{name}: not an OpenAI error: {r.status_code} {r.text[:200]} ({e})")
            return
        if name.startswith("ssrf"):
            ssrf_messages.add(err["message"])

    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as c:
        for name, body in bad_json_bodies():
            check(name, c.post("/v1/chat/completions", json=body))
        for name, raw in bad_images():
            check(f"chat {name}", c.post("/v1/chat/completions", json=chat_body(raw)))
        for name, raw in bad_images()[:12]:
            point = {"image": base64.b64encode(raw).decode(), "object": "dots"}
            check(f"point {name}", c.post("/v1/point", json=point))
        for name, url in bad_urls(server):
            part = {"type": "image_url", "image_url": {"url": url}}
            check(
                name,
                c.post(
                    "/v1/chat/completions", json={"messages": [{"role": "user", "content": [part]}]}
                ),
            )
        for name, body in [
            ("point blank object", {"image": "eA==", "object": "  \n "}),
            ("point empty object", {"image": "eA==", "object": ""}),
            ("point object number", {"image": "eA==", "object": 5}),
            ("point long object", {"image": "eA==", "object": "x" * 2000}),
            ("point no image", {"object": "x"}),
            ("point image not base64", {"image": "not base64!", "object": "x"}),
            ("point max_tokens string", {"image": "eA==", "object": "x", "max_tokens": "5"}),
        ]:  # fmt: skip
            check(name, c.post("/v1/point", json=body))
    for name, data in raw_http(server):
        check(f"http {name}", parse_raw(send_raw(server, data)))

    print(f"corpus: {len(statuses)} bad inputs; statuses {sorted(set(statuses.values()))}")
    assert len(statuses) >= 100
    assert not failures, "\n".join(failures)
    assert len(ssrf_messages) == 1, ssrf_messages  # the answers do not map the network
    m = settle(server)
    assert not server_errors(m), server_errors(m)
    ok = httpx.post(
        f"{server.url}/v1/chat/completions",
        headers=AUTH,
        json=chat_body(encode_image(Image.new("RGB", (64, 48)))),
        timeout=120,
    )
    assert ok.status_code == 200, ok.text


@pytest.mark.vllm
@pytest.mark.server
def test_slow_uploads_disconnects_and_stalled_readers(server: Server) -> None:
    host = server.url.removeprefix("http://")
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
        "Content-Type: application/json\r\n"
    )
    big = json.dumps(chat_body(encode_image(Image.new("RGBA", LIMIT_SIZE, (1, 2, 3, 4))))).encode()
    before = metrics_of(server)

    # Slow uploads that stall for good: the body deadline (2 s here) answers 408.
    stalled = [
        head.encode() + b"Content-Length: 1000\r\n\r\n" + b'{"messages": ',
        head.encode() + b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"mes\r\n',
        head.encode() + f"Content-Length: {len(big)}\r\n\r\n".encode() + big[: len(big) // 2],
    ]
    for data in stalled:
        assert_openai_error(parse_raw(send_raw(server, data)), 408, "request_timeout")
    # Headers that stall (a slowloris): the header deadline (2 s here) answers 408 before the
    # app sees the request, so it is not among the app's 408s counted below.
    err = assert_openai_error(parse_raw(send_raw(server, head.encode())), 408, "request_timeout")
    assert "headers" in err["message"]

    # Clients that leave: during the upload, during image decoding, and while generating.
    leaving = [
        head.encode() + b"Content-Length: 1000\r\n\r\n" + b'{"messages": ',
        head.encode() + f"Content-Length: {len(big)}\r\n\r\n".encode() + big,
        head.encode() + f"Content-Length: {len(big)}\r\n\r\n".encode() + big,
    ]
    for data in leaving:
        send_raw(server, data, read=False)
    long = {"messages": [{"role": "user", "content": "Go on."}], "max_tokens": 2900,
            "ignore_eos": True, "stream": True, "n": 4, "temperature": 1.0,
            "logprobs": True, "top_logprobs": 20}  # fmt: skip
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as c:
        for _ in range(2):  # a reader that stops reading, then goes away
            with c.stream("POST", "/v1/chat/completions", json=long) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                time.sleep(2)  # not reading: the server's buffer for this stream stays bounded
        non_stream = {**long, "stream": False}
        with pytest.raises(httpx.ReadTimeout):  # gives up while the engine generates
            c.post("/v1/chat/completions", json=non_stream, timeout=3)

    m = settle(server)
    key = 'molmo_requests_total{route="/v1/chat/completions",status="%s"}'
    assert m.get(key % 499, 0) - before.get(key % 499, 0) >= 2  # client aborts: 499, not 500
    assert m.get(key % 408, 0) - before.get(key % 408, 0) == 3
    assert not server_errors(m), server_errors(m)
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200


@pytest.mark.vllm
@pytest.mark.server
def test_the_server_exits_1_when_the_engine_dies(server: Server) -> None:
    """Runs last: it ends the module's server."""
    children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text()
    assert children.split()
    for pid in children.split():  # the engine core (and multiprocessing's helpers)
        os.kill(int(pid), signal.SIGKILL)
    assert server.proc.wait(120) == 1
