"""One benchmark request: sent, streamed and timed on the client, then scored.

`send` posts a sample to the chat endpoint (streamed, `stream_options.include_usage`) or to
`/v1/point` (one JSON answer) and returns a `RequestRecord`. Each SSE `data:` line is timed
with `clock()` as it is read, so the times are what a client sees, network and server
included. The clock is injectable: the tests drive it from a scripted server to check every
metric exactly. Errors never raise: the record carries the status (None when no response
came) and the message, so one failure does not end the run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from molmo_bench.datasets import Sample
from molmo_bench.metrics import RequestRecord
from molmo_model.points import parse_count, parse_points, point_scores

Clock = Callable[[], float]


@dataclass
class RequestConfig:
    """What every request of a run asks for."""

    endpoint: str = "chat"  # "chat" (streamed chat completions) or "point" (/v1/point)
    model: str | None = None  # None: no `model` sent (the runner sets each request's from its mix)
    max_tokens: int = 32
    temperature: float = 0.0
    ignore_eos: bool = False  # vLLM's extension: always generate max_tokens


def chat_body(sample: Sample, cfg: RequestConfig) -> dict[str, Any]:
    content = [
        {"type": "image_url", "image_url": {"url": sample.image_url}},
        {"type": "text", "text": sample.question},
    ]
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": cfg.max_tokens,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.model:
        body["model"] = cfg.model
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    return body


def _error_message(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return r.text[:300] or r.reason_phrase


def score(rec: RequestRecord, sample: Sample, endpoint: str) -> None:
    """Points in the answer and, where the sample has truth, F1 / count correctness."""
    points = parse_points(rec.text, sample.width, sample.height)
    rec.num_points = len(points)
    pointing = endpoint == "point" or sample.task == "point"
    if pointing and sample.boxes is not None:
        rec.f1 = point_scores([(p.x, p.y) for p in points], sample.boxes)["f1"]
    if sample.count is not None and (endpoint == "point" or sample.task == "count"):
        said = len(points) if endpoint == "point" else parse_count(rec.text)
        rec.count_correct = said == sample.count


async def _stream_chat(
    http: httpx.AsyncClient, sample: Sample, cfg: RequestConfig, rec: RequestRecord, clock: Clock
) -> None:
    t0 = clock()
    async with http.stream("POST", "/v1/chat/completions", json=chat_body(sample, cfg)) as r:
        rec.status = r.status_code
        if r.status_code != 200:
            await r.aread()
            rec.error = _error_message(r)
            rec.e2e = clock() - t0
            return
        last: float | None = None
        pieces: list[str] = []
        chunks = 0
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            now = clock()
            payload = line[5:].strip()
            if payload == "[DONE]":
                rec.ok = rec.error is None
                break
            data = json.loads(payload)
            if "error" in data:
                rec.error = str(data["error"].get("message", data["error"]))
                continue
            if data.get("choices"):
                if rec.first_chunk is None:
                    rec.first_chunk = now - t0
                content = data["choices"][0].get("delta", {}).get("content")
                if content:
                    if rec.ttft is None:
                        rec.ttft = now - t0
                    else:
                        rec.itl.append(now - last)
                    last = now
                    pieces.append(content)
                    chunks += 1
            if usage := data.get("usage"):
                rec.output_tokens = usage.get("completion_tokens")
                rec.prompt_tokens = usage.get("prompt_tokens")
        else:
            rec.error = rec.error or "the stream ended before [DONE] (server gone?)"
        rec.e2e = clock() - t0
        rec.text = "".join(pieces)
        if rec.output_tokens is None:
            rec.output_tokens = chunks


async def _point(
    http: httpx.AsyncClient, sample: Sample, cfg: RequestConfig, rec: RequestRecord, clock: Clock
) -> None:
    body: dict[str, Any] = {"image": sample.image_url, "object": sample.object, "max_tokens": cfg.max_tokens}
    if cfg.model:
        body["model"] = cfg.model
    t0 = clock()
    r = await http.post("/v1/point", json=body)
    rec.e2e = clock() - t0
    rec.status = r.status_code
    if r.status_code != 200:
        rec.error = _error_message(r)
        return
    data = r.json()
    rec.text = data.get("text", "")
    usage = data.get("usage") or {}
    rec.output_tokens, rec.prompt_tokens = usage.get("completion_tokens"), usage.get("prompt_tokens")
    rec.ok = True


async def send(
    http: httpx.AsyncClient,
    sample: Sample,
    cfg: RequestConfig,
    index: int,
    run_start: float,
    clock: Clock = time.perf_counter,
) -> RequestRecord:
    """Sends `sample`, returns its record (never raises for HTTP or network errors)."""
    rec = RequestRecord(index, sample.image_id, sample.first_of_image, sample.task, clock() - run_start, model=cfg.model)
    try:
        if cfg.endpoint == "point":
            await _point(http, sample, cfg, rec, clock)
        else:
            await _stream_chat(http, sample, cfg, rec, clock)
    except httpx.ConnectError as e:
        rec.ok, rec.error = False, f"cannot connect: {e}"
    except httpx.TimeoutException:
        rec.ok, rec.error = False, "timed out"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        rec.ok, rec.error = False, f"{type(e).__name__}: {e}"
    if rec.ok:
        score(rec, sample, cfg.endpoint)
    return rec
