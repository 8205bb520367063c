"""The server without the engine: schemas, errors, limits, images, prompts, points, metrics.

The app runs in-process behind httpx's ASGI transport with no engine (engine_factory=None),
so /health is 503 and everything a request meets before the engine is exercised for real.
The end-to-end tests with vLLM are in test_server_e2e.py.

    pytest tests/test_server_app.py -q
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from helpers import assert_openai_error, data_url, image_bytes
from PIL import Image

from molmo_vllm.prompt import build_prompt, prompt_token_ids
from server.app import create_app
from server.cli import DEMO_MODEL, config_from_args, default_model_dir, serve
from server.config import ServerConfig
from server.errors import APIError
from server.images import ImageFetcher, RemoteImages, split_data_url
from server.metrics import ServerMetrics
from server.outputs import engine_error, logprobs, sampling
from server.points import pixel_points, points_in_answer
from server.protocol import ChatCompletionRequest, ChatMessage
from server.serving import Serving, chat_of

KEY = "sekret"


def user(*parts: object) -> dict:
    content = [
        {"type": "text", "text": p} if isinstance(p, str) else {"type": "image_url", "image_url": p}
        for p in parts
    ]
    return {"role": "user", "content": content}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MOLMO_SERVE_CACHE", str(cache))
        path = default_model_dir(prefer_demo=False)
    assert path == cache / "tiny" and (path / "config.json").is_file()
    # In a checkout the default is the committed, trained demo model.
    assert default_model_dir() == DEMO_MODEL and (DEMO_MODEL / "model.safetensors").is_file()
    return str(path)


@pytest.fixture()
def config(model_dir: str) -> ServerConfig:
    return ServerConfig(model=model_dir, api_key=KEY, max_body_bytes=100_000, max_images=2)


@pytest.fixture()
def serving(config: ServerConfig) -> Serving:
    from molmo_model.tokenizer import MolmoTokenizer
    from server.engine import ModelInfo

    info = ModelInfo.from_dir(config.model)
    return Serving(config, info, MolmoTokenizer.from_dir(config.model), ServerMetrics())


async def _client(config: ServerConfig):
    app = create_app(config, engine_factory=None)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def run(coro):
    return asyncio.run(coro)


# ---------------------------------------------------------------- HTTP: errors and gate


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": []}, "messages"),
        ({}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [user({"detail": "low"})]}, "messages[0].content[0].image_url.url"),
        (
            {"messages": [{"role": "user", "content": [{"type": "audio"}]}]},
            "messages[0].content[0]",
        ),
        ({"messages": [user("hi")], "temperature": 2.5}, "temperature"),
        ({"messages": [user("hi")], "top_p": 0}, "top_p"),
        ({"messages": [user("hi")], "max_tokens": 0}, "max_tokens"),
        ({"messages": [user("hi")], "n": 0}, "n"),
        ({"messages": [user("hi")], "top_logprobs": 30, "logprobs": True}, "top_logprobs"),
        ({"messages": [user("hi")], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [user("hi")], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": [user("hi")], "stop": [""]}, "stop"),
        ({"messages": [user("hi")], "stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": [user("hi")], "seed": 2**70}, "seed"),
        ({"messages": [user("hi")], "repetition_penalty": 0}, "repetition_penalty"),
        ({"messages": [user("hi")], "min_p": 1.5}, "min_p"),
        ({"messages": [user("hi")], "top_k": -2}, "top_k"),
    ],
)
def test_bad_fields_are_400_naming_the_field(config: ServerConfig, body: dict, param: str) -> None:
    async def go():
        async with await _client(config) as c:
            return await c.post(
                "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
            )

    assert_openai_error(run(go()), 400, param=param)


def test_point_bad_fields(config: ServerConfig) -> None:
    async def go():
        async with await _client(config) as c:
            h = {"Authorization": f"Bearer {KEY}"}
            return [
                await c.post("/v1/point", json={"image": "x"}, headers=h),
                await c.post("/v1/point", json={"image": "x", "object": ""}, headers=h),
            ]

    missing, empty = run(go())
    assert_openai_error(missing, 400, param="object", code="missing_required_parameter")
    assert_openai_error(empty, 400, param="object")


def test_invalid_json_nan_and_wrong_content_type(config: ServerConfig) -> None:
    async def go():
        async with await _client(config) as c:
            h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
            return [
                await c.post("/v1/chat/completions", content=b"{not json", headers=h),
                await c.post(
                    "/v1/chat/completions",
                    content=b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
                    headers=h,
                ),
                await c.post("/v1/chat/completions", content=b"[1, 2]", headers=h),
            ]

    bad_json, nan, array = run(go())
    assert_openai_error(bad_json, 400, code="invalid_json")
    assert_openai_error(nan, 400, param="temperature")
    assert_openai_error(array, 400)


def test_api_key(config: ServerConfig) -> None:
    async def go():
        async with await _client(config) as c:
            body = {"messages": [user("hi")]}
            return [
                await c.post("/v1/chat/completions", json=body),
                await c.post(
                    "/v1/chat/completions", json=body, headers={"Authorization": "Bearer no"}
                ),
                await c.post("/v1/chat/completions", json=body, headers={"Authorization": KEY}),
                await c.get("/v1/models"),
                await c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}),
                await c.get("/health"),  # open: load balancers probe it without a key
                await c.get("/metrics"),
            ]

    none, wrong, no_scheme, models_401, models, health, metrics = run(go())
    for r in (none, wrong, no_scheme, models_401):
        assert_openai_error(r, 401, code="invalid_api_key")
        assert r.json()["error"]["type"] == "authentication_error"
    assert models.status_code == 200
    assert models.json()["data"][0]["id"] == "tiny"
    assert health.status_code == 503 and metrics.status_code == 200


def test_body_limit_by_header_and_by_stream(config: ServerConfig) -> None:
    big = b'{"messages": [{"role": "user", "content": "' + b"x" * 200_000 + b'"}]}'

    async def chunks():
        for i in range(0, len(big), 10_000):
            yield big[i : i + 10_000]

    async def go():
        async with await _client(config) as c:
            h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
            by_header = await c.post("/v1/chat/completions", content=big, headers=h)
            streamed = await c.post("/v1/chat/completions", content=chunks(), headers=h)
            assert "content-length" not in streamed.request.headers
            still_ok = await c.get("/v1/models", headers=h)
            return by_header, streamed, still_ok

    by_header, streamed, still_ok = run(go())
    assert_openai_error(by_header, 413, code="request_too_large")
    assert_openai_error(streamed, 413, code="request_too_large")
    assert still_ok.status_code == 200


def test_health_503_and_chat_503_before_engine(config: ServerConfig) -> None:
    async def go():
        async with await _client(config) as c:
            h = {"Authorization": f"Bearer {KEY}"}
            return await c.get("/health"), await c.post(
                "/v1/chat/completions", json={"messages": [user("hi")]}, headers=h
            )

    health, chat = run(go())
    assert_openai_error(health, 503, code="engine_not_ready")
    assert_openai_error(chat, 503, code="engine_not_ready")
    assert chat.headers["retry-after"]


def test_unknown_route_and_method_are_openai_shaped(config: ServerConfig) -> None:
    async def go():
        async with await _client(config) as c:
            h = {"Authorization": f"Bearer {KEY}"}
            return await c.get("/v1/nothing", headers=h), await c.get(
                "/v1/chat/completions", headers=h
            )

    missing, method = run(go())
    assert_openai_error(missing, 404)
    assert_openai_error(method, 405)


def test_metrics_count_requests_by_route_and_status(config: ServerConfig) -> None:
    async def go():
        async with await _client(config) as c:
            await c.post("/v1/chat/completions", json={})
            await c.post(
                "/v1/chat/completions", json={}, headers={"Authorization": f"Bearer {KEY}"}
            )
            await c.get("/health")
            await c.get("/no/such/path")
            return await c.get("/metrics")

    r = run(go())
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'molmo_requests_total{route="/v1/chat/completions",status="401"} 1.0' in text
    assert 'molmo_requests_total{route="/v1/chat/completions",status="400"} 1.0' in text
    assert 'molmo_requests_total{route="/health",status="503"} 1.0' in text
    assert 'molmo_requests_total{route="other",status="404"} 1.0' in text
    for name in (
        "molmo_time_to_first_token_seconds_bucket",
        "molmo_inter_token_latency_seconds_bucket",
        "molmo_e2e_request_latency_seconds_bucket",
        "molmo_image_preprocess_seconds_bucket",
        "molmo_prompt_tokens_total",
        "molmo_generation_tokens_total",
        "molmo_requests_running",
        "molmo_requests_waiting",
    ):
        assert name in text, name


def test_openapi_document_describes_the_routes(config: ServerConfig) -> None:
    async def go():
        async with await _client(config) as c:
            return (await c.get("/openapi.json")).json()

    doc = run(go())
    paths = doc["paths"]
    for route in ("/v1/chat/completions", "/v1/point", "/v1/models", "/health", "/metrics"):
        assert route in paths
    assert "400" in paths["/v1/chat/completions"]["post"]["responses"]
    assert "points" in doc["components"]["schemas"]["AssistantMessage"]["properties"]


# ---------------------------------------------------------------- sampling params


def test_request_to_sampling_params() -> None:
    from vllm.sampling_params import RequestOutputKind

    req = ChatCompletionRequest.model_validate(
        {
            "messages": [user("hi")],
            "temperature": 0.7,
            "top_p": 0.9,
            "n": 3,
            "stop": "END",
            "seed": 42,
            "logprobs": True,
            "top_logprobs": 4,
            "top_k": 20,
            "min_p": 0.05,
            "repetition_penalty": 1.1,
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "max_completion_tokens": 9,
            "min_tokens": 2,
            "ignore_eos": True,
        }
    )
    assert req.requested_max_tokens == 9
    p = req.to_sampling_params(max_tokens=9, stream=False)
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (0.7, 0.9, 20, 0.05)
    assert (p.n, p.seed, p.logprobs, p.max_tokens) == (3, 42, 4, 9)
    assert p.stop == ["END"]
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.1, 0.5, -0.5)
    assert p.output_kind == RequestOutputKind.FINAL_ONLY
    assert (p.min_tokens, p.ignore_eos) == (2, True)
    assert req.to_sampling_params(9, stream=True).output_kind == RequestOutputKind.DELTA

    plain = ChatCompletionRequest.model_validate({"messages": [user("hi")], "max_tokens": 5})
    q = plain.to_sampling_params(5, stream=False)
    assert q.logprobs is None and q.stop == [] and q.n == 1 and q.temperature == 1.0
    logprobs_only = ChatCompletionRequest.model_validate(
        {"messages": [user("hi")], "logprobs": True}
    )
    assert logprobs_only.to_sampling_params(5, stream=False).logprobs == 0


def test_vllm_only_checks_become_400() -> None:
    greedy_n = ChatCompletionRequest.model_validate(
        {"messages": [user("hi")], "n": 2, "temperature": 0}
    )
    with pytest.raises(APIError) as e:
        sampling(lambda: greedy_n.to_sampling_params(4, stream=False))
    assert e.value.status == 400 and "n must be 1" in e.value.message


def test_engine_errors_map_to_client_or_server_status() -> None:
    from vllm.exceptions import QueueOverflowError, VLLMValidationError
    from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

    wrapped = EngineGenerateError()
    wrapped.__cause__ = ValueError("prompt has 2 <|image|> placeholders for 1 image")
    cases = [
        (VLLMValidationError("too long", parameter="max_tokens"), 400, "max_tokens"),
        (wrapped, 400, None),
        (QueueOverflowError(), 503, None),
        (EngineDeadError(), 503, None),
        (RuntimeError("bug"), 500, None),
    ]
    for error, status, param in cases:
        e = engine_error(error)
        assert (e.status, e.param) == (status, param), error
        assert e.body()["error"]["message"]


def test_logprobs_follow_openais_shape(serving: Serving) -> None:
    from vllm.logprobs import Logprob

    tok = serving.tokenizer
    a, b, c = tok.encode("a")[0], tok.encode("b")[0], tok.encode("c")[0]
    positions = [
        {a: Logprob(-0.1, 1, "a"), b: Logprob(-2.5, 2, "b"), c: Logprob(float("-inf"), 40, None)},
        {a: Logprob(-0.3, 1, "a"), b: Logprob(-1.5, 2, "b")},
    ]
    out = logprobs(tok, [c, a], positions, top=2).model_dump()["content"]
    sampled_c, sampled_a = out
    assert sampled_c["token"] == "c" and sampled_c["logprob"] == -9999.0  # -inf is not JSON
    assert [t["token"] for t in sampled_c["top_logprobs"]] == ["a", "b"]  # rank order, top 2
    assert sampled_a["logprob"] == -0.3 and sampled_a["bytes"] == [ord("a")]
    assert logprobs(tok, [a], positions[:1], top=0).content[0].top_logprobs == []


# ---------------------------------------------------------------- images


def test_data_urls() -> None:
    raw = image_bytes()
    assert split_data_url(data_url(raw), "p") == raw
    assert split_data_url(data_url(raw, "image/jpeg;charset=x"), "p") == raw  # type is not trusted
    for bad, why in [
        ("data:text/plain;base64,aGVsbG8=", "not an image"),
        ("data:image/png,rawbytes", "base64"),
        ("data:image/png;base64,@@@@", "base64"),
        ("data:image/png;base64,", "base64"),
        ("data:", "malformed"),
    ]:
        with pytest.raises(APIError) as e:
            split_data_url(bad, "messages[0].content[0].image_url")
        assert e.value.status == 400 and why in e.value.message
        assert e.value.param == "messages[0].content[0].image_url"


def test_image_loading_errors_name_the_field() -> None:
    fetcher = ImageFetcher(max_pixels=10_000)

    async def load(ref: str, bare: bool = False):
        return await fetcher.load(ref, "image", bare_base64=bare)

    assert run(load(data_url(image_bytes(40, 30)))).size == (40, 30)
    assert run(load(base64.b64encode(image_bytes(20, 10)).decode(), bare=True)).size == (20, 10)
    cases = [
        (data_url(b"definitely not an image"), False),
        (data_url(image_bytes()[:40]), False),  # truncated
        (data_url(image_bytes(200, 100)), False),  # 20,000 pixels > 10,000
        ("http://127.0.0.1:9/x.png", False),  # remote off
        ("file:///etc/passwd", False),
        ("/etc/passwd", True),  # a bare string is base64, never a path
    ]
    for ref, bare in cases:
        with pytest.raises(APIError) as e:
            run(load(ref, bare))
        assert (
            e.value.status == 400 and e.value.param == "image" and e.value.code == "invalid_image"
        )


class _ImageHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/slow.png":
            time.sleep(2)
        if self.path == "/missing.png":
            self.send_response(404)
            self.end_headers()
            return
        body = image_bytes(64, 32) if self.path != "/big.png" else b"\0" * 50_000
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # the slow response's client is gone by design


def test_remote_images_with_size_and_time_limits() -> None:
    httpd = _QuietServer(("127.0.0.1", 0), _ImageHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    base = f"http://127.0.0.1:{port}"
    # Loopback and this port are allowed here only; by default both are refused.
    remote = RemoteImages(timeout=0.5, max_bytes=20_000, allow_private=True, ports=(port,))
    fetcher = ImageFetcher(max_pixels=10**6, allow_remote=True, remote=remote)
    closed = ImageFetcher(max_pixels=10**6, allow_remote=True, remote=RemoteImages(0.5, 20_000))

    async def go():
        ok = await fetcher.load(f"{base}/ok.png", "u")
        errors = []
        for f, path in [(fetcher, "/big.png"), (fetcher, "/slow.png"), (fetcher, "/missing.png"),
                        (closed, "/ok.png")]:  # fmt: skip
            try:
                await f.load(f"{base}{path}", "u")
            except APIError as e:
                errors.append(e)
        await fetcher.aclose()
        return ok, errors

    try:
        ok, errors = run(go())
    finally:
        httpd.shutdown()
    assert ok.size == (64, 32)
    assert [e.status for e in errors] == [400, 400, 400, 400]
    # One message whatever went wrong: answers must not map the network behind the server.
    assert len({e.message for e in errors}) == 1 and "20000 bytes within 0.5 s" in errors[0].message


# ---------------------------------------------------------------- prompts


def test_prompt_ids_follow_molmos_chat_format(serving: Serving) -> None:
    tok = serving.tokenizer
    raw = [
        {"role": "developer", "content": "Be brief."},
        user({"url": "A"}, " What ", {"url": "B"}, "is it? "),
        {"role": "assistant", "content": "A dog."},
        user("And <|image|> here<|endoftext|>?", {"url": "C"}),
    ]
    chat = chat_of([ChatMessage.model_validate(m) for m in raw])
    assert [r.source for r in chat.images] == ["A", "B", "C"]
    assert chat.images[2].param == "messages[3].content[1].image_url"
    ids = prompt_token_ids(tok, chat.turns, 3)
    assert ids[:4] == [tok.bos_id, tok.image_id, tok.image_id, tok.image_id]
    # developer -> system; a message's text parts are stripped and joined with one space
    text = " User: Be brief. What is it? Assistant: A dog. User: And <|image|> here<|endoftext|>? Assistant:"
    assert ids[4:] == tok.encode(text)
    # User text cannot smuggle in special tokens: only our placeholders are image ids.
    assert ids.count(tok.image_id) == 3 and ids.count(tok.bos_id) == 1
    # The one prompt builder: offline callers (molmo eval, benchmarks, parity tests) get the
    # same ids for the same messages as the server sends to the engine.
    images = [Image.new("RGB", (8, 8))] * 3
    assert build_prompt(tok, raw, images) == {
        "prompt_token_ids": ids,
        "multi_modal_data": {"image": images},
    }


def test_prompt_errors() -> None:
    with pytest.raises(APIError) as e:
        chat_of(
            [
                ChatMessage.model_validate(user("hi")),
                ChatMessage.model_validate(
                    {
                        "role": "assistant",
                        "content": [{"type": "image_url", "image_url": {"url": "x"}}],
                    }
                ),
            ]
        )
    assert e.value.status == 400 and e.value.param == "messages[1].content[0]"
    with pytest.raises(APIError) as e:
        chat_of([ChatMessage.model_validate({"role": "system", "content": "only"})])
    assert e.value.param == "messages"


def test_too_many_images_and_context_checks(serving: Serving) -> None:
    from molmo_model.preprocessing import image_token_count

    url = data_url(image_bytes(40, 30))
    msgs = [{"role": "user", "content": "hi"}]

    with pytest.raises(APIError) as e:
        run(serving.prepare(msgs, [(url, "a"), (url, "b"), (url, "c")]))
    assert e.value.status == 400 and e.value.code == "too_many_images"

    prepared = run(serving.prepare(msgs, [(url, "a"), (url, "b")]))
    text_ids = len(prompt_token_ids(serving.tokenizer, msgs, 0))
    assert prepared.prompt_len == text_ids + 2 * image_token_count(40, 30)
    assert prepared.sizes == [(40, 30), (40, 30)]
    assert len(prepared.prompt["multi_modal_data"]["image"]) == 2

    room = serving.max_model_len - prepared.prompt_len
    assert serving.max_tokens(None, prepared.prompt_len, "max_tokens") == room
    with pytest.raises(APIError) as e:
        serving.max_tokens(room + 1, prepared.prompt_len, "max_tokens")
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"

    long_text = [{"role": "user", "content": "word " * serving.max_model_len}]
    with pytest.raises(APIError) as e:
        run(serving.prepare(long_text, [(url, "a")]))
    assert e.value.status == 400 and e.value.code == "context_length_exceeded"


def test_exif_orientation_sets_the_pixel_frame(serving: Serving) -> None:
    # Stored 80x40 with "rotate 90" in EXIF: the user sees (and points into) a 40x80 image.
    raw = image_bytes(80, 40, "JPEG", color="white", orientation=6)
    prepared = run(
        serving.prepare([{"role": "user", "content": "x"}], [(data_url(raw, "image/jpeg"), "i")])
    )
    assert prepared.sizes == [(40, 80)]
    [p] = pixel_points('<point x="25.0" y="75.0" alt="a">a</point>', prepared.sizes[0])
    assert (p.x, p.y) == pytest.approx((10.0, 60.0))


# ---------------------------------------------------------------- points


def test_points_map_to_the_image_they_name() -> None:
    v1 = '<points x1="10.0" y1="20.0" x2="50.0" y2="100.0" alt="dogs">dogs</points>'
    pts = points_in_answer(v1, [(640, 480), (100, 100)])
    assert [(p.x, p.y, p.image_index, p.label) for p in pts] == [
        (64.0, 96.0, 0, "dogs"),
        (320.0, 480.0, 0, "dogs"),
    ]
    assert (pts[0].x_norm, pts[0].y_norm) == pytest.approx((0.1, 0.2))

    molmo2 = '<points alt="cat" coords="1 1 500 500\t2 1 100 900">cat</points>'
    a, b = points_in_answer(molmo2, [(200, 100), (1000, 2000)])
    assert (a.image_index, a.x, a.y) == (0, 100.0, 50.0)
    assert (b.image_index, b.x, b.y) == (1, pytest.approx(100.0), pytest.approx(1800.0))

    # A point at an image the request does not have keeps only normalized coordinates.
    [c] = points_in_answer('<points alt="x" coords="3 1 500 500">x</points>', [(10, 10)])
    assert (c.image_index, c.x, c.y, c.x_norm) == (2, None, None, 0.5)
    [d] = points_in_answer('<point x="50" y="50">x</point>', [])  # text-only chat
    assert d.x is None and d.x_norm == 0.5


def test_pixel_points_not_present_and_garbage() -> None:
    assert pixel_points("There are none.", (10, 10)) == []
    assert pixel_points('<point x="120" y="5">over 100 is dropped</point>', (10, 10)) == []
    assert pixel_points("<points x1=", (10, 10)) == []
    [p] = pixel_points('<point x="61.5" y="40.2" alt="a dog">a dog</point>', (200, 100))
    assert (p.x, p.y) == pytest.approx((123.0, 40.2))


# ---------------------------------------------------------------- CLI and config


def test_cli_flags_build_the_config(model_dir: str) -> None:
    c = config_from_args(
        [
            "--model", model_dir, "--port", "9001", "--api-key", "k", "--max-images", "3",
            "--allow-remote-images", "--max-model-len", "1024", "--max-num-seqs", "8",
            "--max-queue", "5", "--max-body-bytes", "1000", "--max-image-pixels", "500",
            "--enforce-eager",
        ]
    )  # fmt: skip
    assert (c.port, c.api_key, c.max_images, c.allow_remote_images) == (9001, "k", 3, True)
    assert (c.max_model_len, c.max_num_seqs, c.max_queue) == (1024, 8, 5)
    assert (c.max_body_bytes, c.max_image_pixels, c.enforce_eager) == (1000, 500, True)


def test_bad_flags_exit_2(model_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert serve(["--model", model_dir, "--max-images", "0"]) == 2
    assert "max_images" in capsys.readouterr().err
    assert serve(["--model", "/nonexistent/folder"]) == 2
    assert "config.json" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_queue"):
        ServerConfig(model=model_dir, max_queue=0)


def test_points_carry_no_float_noise() -> None:
    [p] = points_in_answer('<point x="45.9" y="39.5" alt="c">c</point>', [(336, 336)])
    assert (p.x_norm, p.y_norm, p.x, p.y) == (0.459, 0.395, 154.22, 132.72)
