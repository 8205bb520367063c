"""The real server process on vLLM, driven by the official `openai` client and httpx.

One server per module (`python -m server` on 127.0.0.1, a free port, a tiny random-weight
checkpoint, eager mode, VLLM_CPU_KVCACHE_SPACE=1). The random model's words are noise, so
tests check what the server owes whatever the words are: shapes, counts, usage, stop
handling, points consistent with the returned text, errors, load and cancellation. The
last test sends SIGTERM and checks the graceful exit.

    pytest tests/test_server_e2e.py -q        # ~3-5 min on 2 CPU cores
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
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image

pytestmark = [pytest.mark.vllm, pytest.mark.server]
openai = pytest.importorskip("openai")
pytest.importorskip("vllm")

KEY = "test-key"
MAX_MODEL_LEN = 1536
MAX_QUEUE = 40
MAX_IMAGES = 3
MAX_BODY = 3_000_000
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path
    saw_503: bool
    model_dir: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    from molmo_model.checkpoint import init_checkpoint

    tmp = tmp_path_factory.mktemp("server")
    model_dir = str(init_checkpoint("tiny", tmp / "tiny"))
    port = _free_port()
    log = tmp / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [
        sys.executable, "-m", "server", "--model", model_dir, "--port", str(port),
        "--api-key", KEY, "--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN),
        "--max-num-seqs", "32", "--max-queue", str(MAX_QUEUE), "--max-images", str(MAX_IMAGES),
        "--max-body-bytes", str(MAX_BODY), "--shutdown-timeout", "20",
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    saw_503, deadline = False, time.monotonic() + 900
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"server not ready in time:\n{log.read_text()[-4000:]}")
        try:
            code = httpx.get(f"{url}/health", timeout=5).status_code
        except httpx.HTTPError:
            code = None
        saw_503 |= code == 503
        if code == 200:
            break
        time.sleep(0.5)
    yield Server(url, proc, log, saw_503, model_dir)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def client(server: Server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(server: Server):
    from molmo_model.tokenizer import MolmoTokenizer

    return MolmoTokenizer.from_dir(server.model_dir)


def image_bytes(width: int, height: int, fmt: str = "PNG", exif_rotate: bool = False) -> bytes:
    img = Image.new("RGB", (width, height), "white")
    img.paste((255, 0, 0), (width // 4, height // 4, width // 2, height // 2))
    buf = io.BytesIO()
    if exif_rotate:
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90: the user sees height x width
        img.save(buf, fmt, exif=exif.tobytes())
    else:
        img.save(buf, fmt)
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def image_part(raw: bytes, mime: str = "image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(raw, mime)}}


def expected_prompt_tokens(tokenizer, messages: list[dict], sizes: list[tuple[int, int]]) -> int:
    from molmo_model.preprocessing import image_token_count, prompt_text

    text = len(tokenizer.encode(prompt_text(messages)))
    return 1 + text + sum(image_token_count(w, h) for w, h in sizes)


def metric(server: Server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    pattern = re.escape(name) if name.endswith(",") else rf"{re.escape(name)}(?:{{[^}}]*}})?"
    if name.endswith(","):  # a label prefix: match the rest of the labels
        pattern += r"[^}]*}"
    m = re.search(rf"^{pattern} (\S+)$", text, re.MULTILINE)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def wait_idle(server: Server, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    names = (
        "molmo_requests_running",
        "molmo_requests_waiting",
        "molmo_engine_unfinished_requests",  # vLLM's output processor
        "vllm:num_requests_running",  # vLLM's scheduler
        "vllm:num_requests_waiting",
    )
    while True:
        values = {n: metric(server, n) for n in names}
        if not any(values.values()):
            return
        assert time.monotonic() < deadline, f"server not idle: {values}"
        time.sleep(0.2)


def assert_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err


# ---------------------------------------------------------------- lifecycle and models


def test_health_is_503_while_loading_then_200(server: Server) -> None:
    assert server.saw_503
    r = httpx.get(f"{server.url}/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_models(client) -> None:
    [model] = client.models.list().data
    assert model.id == "tiny"
    assert model.model_extra["max_model_len"] == MAX_MODEL_LEN


# ---------------------------------------------------------------- chat


def test_chat_with_images_usage_and_points(client, tokenizer) -> None:
    from server.points import points_in_answer

    a, b = image_bytes(64, 48), image_bytes(480, 300, "JPEG")
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {
            "role": "user",
            "content": [
                image_part(a),
                image_part(b, "image/jpeg"),
                {"type": "text", "text": "Point to the red squares."},
            ],
        },
    ]
    r = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=12, temperature=0
    )
    [choice] = r.choices
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    plain = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Point to the red squares."},
    ]
    assert r.usage.prompt_tokens == expected_prompt_tokens(tokenizer, plain, [(64, 48), (480, 300)])
    assert r.usage.completion_tokens == 12 or choice.finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    points = choice.message.model_extra["points"]
    expected = [
        p.model_dump() for p in points_in_answer(choice.message.content, [(64, 48), (480, 300)])
    ]
    assert points == expected


def test_multi_turn_text_only(client, tokenizer) -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "How many dogs?"},
    ]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3)
    assert r.usage.prompt_tokens == expected_prompt_tokens(tokenizer, messages, [])
    assert r.usage.completion_tokens <= 3
    assert "points" in r.choices[0].message.model_extra


def test_n_choices(client) -> None:
    r = client.chat.completions.create(
        model="tiny",
        messages=[
            {
                "role": "user",
                "content": [image_part(image_bytes(50, 50)), {"type": "text", "text": "Describe."}],
            }
        ],
        max_tokens=6,
        n=3,
        temperature=1.0,
        seed=7,
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens <= 18
    if all(c.finish_reason == "length" for c in r.choices):
        assert r.usage.completion_tokens == 18


def test_stop_strings(client) -> None:
    messages = [{"role": "user", "content": "Count to ten."}]
    full = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=40, temperature=0
    )
    text = full.choices[0].message.content
    # A stop string taken from the greedy answer itself: the second run must end right before it.
    starts = [
        i
        for i in range(4, len(text) - 3)
        if text[i : i + 3].isprintable()
        and "\ufffd" not in text[i : i + 3]
        and text[i : i + 3].strip()
    ]
    assert starts, f"greedy answer too short to pick a stop string: {text!r}"
    stop = text[starts[0] : starts[0] + 3]
    cut = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=40, temperature=0, stop=[stop]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.usage.completion_tokens < full.usage.completion_tokens


def test_logprobs(client) -> None:
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        logprobs=True,
        top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True
        )
        assert entry.logprob <= entry.top_logprobs[0].logprob + 1e-6


def test_streaming_matches_non_streaming(client, server: Server) -> None:
    from server.points import points_in_answer

    messages = [
        {
            "role": "user",
            "content": [image_part(image_bytes(100, 80)), {"type": "text", "text": "Where is it?"}],
        }
    ]
    whole = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == whole.choices[0].finish_reason
    points = finals[0].choices[0].delta.model_extra["points"]
    assert points == [p.model_dump() for p in points_in_answer(text, [(100, 80)])]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()

    raw = httpx.post(
        f"{server.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"messages": messages, "max_tokens": 3, "stream": True},
        timeout=60,
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(e[6:]) for e in events[:-1])


# ---------------------------------------------------------------- pointing


def test_point_endpoint(server: Server, tokenizer) -> None:
    from server.points import pixel_points
    from molmo_vllm.prompt import point_question

    h = {"Authorization": f"Bearer {KEY}"}
    raw = image_bytes(120, 60, "JPEG", exif_rotate=True)  # seen as 60 x 120
    for image in (data_url(raw, "image/jpeg"), base64.b64encode(raw).decode()):
        r = httpx.post(
            f"{server.url}/v1/point",
            headers=h,
            json={"image": image, "object": "red squares", "max_tokens": 8},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["count"] == len(body["points"])
        assert body["points"] == [p.model_dump() for p in pixel_points(body["text"], (60, 120))]
        assert body["usage"]["prompt_tokens"] == expected_prompt_tokens(
            tokenizer, [{"role": "user", "content": point_question("red squares")}], [(60, 120)]
        )
        assert body["usage"]["completion_tokens"] <= 8


# ---------------------------------------------------------------- errors


def test_errors_have_status_and_shape_and_the_server_keeps_serving(server: Server) -> None:
    h = {"Authorization": f"Bearer {KEY}"}
    url = f"{server.url}/v1/chat/completions"
    img = image_part(image_bytes(40, 40))

    def chat(**body):
        return httpx.post(url, headers=h, json={"max_tokens": 2, **body}, timeout=60)

    assert_error(
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(b"GIF89a broken")}}]}]),
        400, "invalid_image", "messages[0].content[0].image_url",
    )  # fmt: skip
    assert_error(
        chat(messages=[{"role": "user", "content": [img] * (MAX_IMAGES + 1)}]),
        400,
        "too_many_images",
    )
    assert_error(
        chat(messages=[{"role": "user", "content": [img] * 3 + [{"type": "text", "text": "dog " * 1000}]}]),
        400, "context_length_exceeded", "messages",
    )  # fmt: skip
    assert_error(
        chat(messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_MODEL_LEN),
        400,
        "context_length_exceeded",
        "max_tokens",
    )
    assert_error(chat(messages=[{"role": "user", "content": "hi"}], n=2, temperature=0), 400)
    assert_error(
        chat(messages=[{"role": "user", "content": "hi"}], temperature=-1), 400, param="temperature"
    )
    assert_error(
        chat(messages=[{"role": "user", "content": "hi"}], model="gpt-4"),
        404,
        "model_not_found",
        "model",
    )
    surrogate = json.dumps({"messages": [{"role": "user", "content": "a\ud800b"}]}).encode()
    assert_error(httpx.post(url, headers=h, content=surrogate, timeout=10), 400, param="messages")
    assert_error(
        httpx.post(url, json={"messages": [{"role": "user", "content": "hi"}]}, timeout=10),
        401,
        "invalid_api_key",
    )
    assert_error(
        httpx.post(url, headers={**h, "Content-Type": "application/json"}, content=b"x" * (MAX_BODY + 1), timeout=10),
        413, "request_too_large",
    )  # fmt: skip
    assert_error(
        httpx.post(f"{server.url}/v1/point", headers=h, json={"image": "not base64!", "object": "x"}, timeout=10),
        400, "invalid_image", "image",
    )  # fmt: skip
    ok = chat(messages=[{"role": "user", "content": [img, {"type": "text", "text": "ok?"}]}])
    assert ok.status_code == 200
    assert 'status="500"' not in httpx.get(f"{server.url}/metrics").text


# ---------------------------------------------------------------- load, queue, disconnects


def test_32_concurrent_requests_all_answered(server: Server) -> None:
    async def go():
        c = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=300)
        img = image_part(image_bytes(64, 64))

        async def one(i: int):
            return await c.chat.completions.create(
                model="tiny",
                messages=[
                    {"role": "user", "content": [img, {"type": "text", "text": f"Request {i}"}]}
                ],
                max_tokens=8,
            )

        try:
            return await asyncio.gather(*(one(i) for i in range(32)))
        finally:
            await c.close()

    results = asyncio.run(go())
    assert len(results) == 32 and len({r.id for r in results}) == 32
    for r in results:
        assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens <= 8
    wait_idle(server)


def test_queue_full_then_disconnects_free_the_engine(server: Server) -> None:
    h = {"Authorization": f"Bearer {KEY}"}
    body = {
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": MAX_MODEL_LEN - 64,
        "ignore_eos": True,  # the random model must not finish on its own
        "stream": True,
    }

    async def go():
        async with httpx.AsyncClient(
            base_url=server.url, headers=h, timeout=120, limits=httpx.Limits(max_connections=100)
        ) as c:

            async def open_stream():
                cm = c.stream("POST", "/v1/chat/completions", json=body)
                r = await cm.__aenter__()
                assert r.status_code == 200
                lines = r.aiter_lines()  # kept: dropping the iterator closes the connection
                assert (await anext(lines)).startswith("data: ")  # admitted, streaming
                return cm, lines

            streams = await asyncio.gather(*(open_stream() for _ in range(MAX_QUEUE)))
            in_flight = metric(server, "molmo_requests_running") + metric(
                server, "molmo_requests_waiting"
            )
            full = await c.post("/v1/chat/completions", json={**body, "stream": False})
            for cm, _ in streams:  # the clients go away mid-stream
                await cm.__aexit__(None, None, None)
            return in_flight, full

    in_flight, full = asyncio.run(go())
    assert in_flight == MAX_QUEUE
    assert_error(full, 429, "queue_full")
    assert full.headers["retry-after"]
    wait_idle(server)

    # Non-streaming requests whose clients give up are aborted too: none of them runs to
    # its 1400 tokens (which would count as finished by "length" and as generated tokens).
    length_done = 'vllm:request_success_total{engine="0",finished_reason="length",'
    before = (metric(server, length_done), metric(server, "molmo_generation_tokens_total"))

    async def give_up():
        async with httpx.AsyncClient(base_url=server.url, headers=h, timeout=1.5) as c:
            long = {**body, "stream": False, "max_tokens": MAX_MODEL_LEN - 100}
            return await asyncio.gather(
                *(c.post("/v1/chat/completions", json=long) for _ in range(8)),
                return_exceptions=True,
            )

    # Each client times out: mostly while reading, but on a loaded 2-core machine a connection
    # may time out before it is made (the request never reaches the server, which is fine).
    gave_up = asyncio.run(give_up())
    assert all(isinstance(r, httpx.TimeoutException) for r in gave_up), gave_up
    assert any(isinstance(r, httpx.ReadTimeout) for r in gave_up), gave_up
    wait_idle(server)
    time.sleep(1)
    assert (metric(server, length_done), metric(server, "molmo_generation_tokens_total")) == before
    ok = httpx.post(
        f"{server.url}/v1/chat/completions",
        headers=h,
        json={**body, "stream": False, "max_tokens": 2},
        timeout=60,
    )
    assert ok.status_code == 200


# ---------------------------------------------------------------- python client


def test_python_client(server: Server) -> None:
    from clients.molmo_client import MolmoAPIError, MolmoClient, Point
    from server.points import pixel_points, points_in_answer

    img = Image.new("RGB", (90, 60), "white")
    with MolmoClient(server.url, api_key=KEY) as client:
        assert client.health() and client.models() == ["tiny"]
        reply = client.chat("Point to the dot.", images=[img], max_tokens=6, n=2, temperature=1.0)
        assert len(reply.choices) == 2 and reply.usage.completion_tokens <= 12
        assert reply.points == [
            Point(**p.model_dump()) for p in points_in_answer(reply.text, [(90, 60)])
        ]
        pieces = list(client.stream_chat("Hi", images=[img], max_tokens=4, temperature=0))
        assert isinstance(pieces[-1], list)  # the points come last
        assert (
            "".join(p for p in pieces if isinstance(p, str))
            == client.chat("Hi", images=[img], max_tokens=4, temperature=0).text
        )
        full = client.point_full(img, "dots", max_tokens=6)
        assert full["points"] == [
            Point(**p.model_dump()) for p in pixel_points(full["text"], (90, 60))
        ]
        assert client.point(img, "dots", max_tokens=6) == full["points"]  # greedy by default
        with pytest.raises(MolmoAPIError) as e:
            client.point(b"not an image", "dots")
        assert (e.value.status, e.value.code, e.value.param) == (400, "invalid_image", "image")
    with MolmoClient(server.url) as anonymous, pytest.raises(MolmoAPIError) as e:
        anonymous.models()
    assert e.value.status == 401


# ---------------------------------------------------------------- fuzz


def test_schemathesis_fuzz_finds_no_server_error(server: Server) -> None:
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    strategy = st.one_of(
        schema.as_strategy(schemathesis.GenerationMode.POSITIVE),
        schema.as_strategy(schemathesis.GenerationMode.NEGATIVE),
    )
    failures: list[str] = []
    statuses: dict[int, int] = {}
    deadline = time.monotonic() + 90  # bounded: stop drawing cases after this

    @settings(
        max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(case=strategy)
    def fuzz(case) -> None:
        if time.monotonic() > deadline:
            return
        if isinstance(case.body, dict):  # keep generation short; everything else is as drawn
            for field in ("max_tokens", "max_completion_tokens"):
                value = case.body.get(field)
                if type(value) is int and value > 4:
                    case.body[field] = 4
            case.body.setdefault("max_tokens", 4)
        response = case.call(
            base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
        )
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        if response.status_code >= 500:
            failures.append(
                f"{case.method} {case.path} {case.body!r:.500} -> {response.status_code} {response.text[:300]}"
            )

    fuzz()
    print(f"fuzz statuses: {statuses}")
    assert not failures, "\n".join(failures[:5])
    assert statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0  # both paths were exercised
    wait_idle(server)


# ---------------------------------------------------------------- shutdown (last)


def test_sigterm_finishes_in_flight_requests_and_exits_cleanly(server: Server) -> None:
    body = {
        "messages": [{"role": "user", "content": "Go on."}],
        "max_tokens": 200,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json=body,
        timeout=120,
    ) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # in flight
        server.proc.send_signal(signal.SIGTERM)
        events = [line for line in lines if line.startswith("data: ")]
    # The request admitted before SIGTERM is served to the end.
    assert events[-1] == "data: [DONE]"
    finals = [json.loads(e[6:]) for e in events[:-1]]
    assert finals[-1]["choices"][0]["finish_reason"] == "length"
    assert server.proc.wait(90) == 0
    with pytest.raises(ProcessLookupError):  # the engine's processes are gone too
        for _ in range(50):
            os.killpg(server.proc.pid, 0)
            time.sleep(0.2)
    log = server.log.read_text()
    assert "Traceback" not in log, log[-3000:]
