"""A benchmark run: check the server, warm up, then drive each load level and time it.

`Runner.run()` fills `Runner.levels` as it goes (each level's records are appended as they
finish), so a caller that catches Ctrl-C or an error still holds every measured request and
can write them. A level stops early when the server is gone: `GONE_AFTER` connection
failures in a row (the rest would only measure refused connections).

A run may mix model names (a base and its LoRA adapters): request i of every level asks
`mix[i % len(mix)]`, so each level gets the same mix whatever its load. The names are checked
against the server's /v1/models before anything is sent (`model_mix`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import httpx

from molmo_bench.client import RequestConfig, send
from molmo_bench.datasets import Sample
from molmo_bench.generator import drive
from molmo_bench.metrics import BenchmarkMetrics, RequestRecord, compute_by_model, compute_metrics

GONE_AFTER = 3  # connection failures in a row that mean the server is gone
ALL_MODELS = "all"  # a mix of every id the server's /v1/models lists


class BenchError(Exception):
    """A run that cannot go on (server unreachable, refused key); the message says why."""


class ServerGone(BenchError):
    pass


class UnknownModel(BenchError):
    """A model name the server does not list: bad usage, found out from the server."""


def model_mix(asked: list[str], listed: list[str], url: str) -> list[str | None]:
    """The names request i picks from (i % len): `asked` checked against the server's ids;
    ["all"]: every listed id; []: the first listed (None, no name sent, if it lists none)."""
    if asked == [ALL_MODELS]:
        if not listed:
            raise UnknownModel(f"--model {ALL_MODELS}: the server at {url} lists no models")
        return list(listed)
    if not asked:
        return listed[:1] or [None]
    unknown = [name for name in dict.fromkeys(asked) if name not in listed]
    if unknown:
        served = ", ".join(repr(n) for n in listed) or "nothing (an empty /v1/models)"
        raise UnknownModel(f"--model: {', '.join(repr(n) for n in unknown)} not served by {url}; it serves {served}")
    return list(asked)


@dataclass
class Load:
    """One load level: a rate (open loop, optionally capped at `concurrency`) or a
    concurrency alone (closed loop)."""

    rate: float | None = None
    concurrency: int | None = None

    def label(self) -> str:
        parts = []
        if self.rate is not None:
            parts.append(f"rate={self.rate:g}/s")
        if self.concurrency is not None:
            parts.append(f"concurrency={self.concurrency}")
        return " ".join(parts)


@dataclass
class Level:
    load: Load
    records: list[RequestRecord] = field(default_factory=list)
    started: float | None = None  # clock at the first request
    ended: float | None = None  # clock when the last one finished (or the run stopped)
    stopped: str | None = None  # why it ended early, if it did

    def duration(self, now: float) -> float:
        end = self.ended if self.ended is not None else now
        return end - self.started if self.started is not None else 0.0

    def metrics(self, slo: dict[str, float], now: float) -> BenchmarkMetrics:
        return compute_metrics(sorted(self.records, key=lambda r: r.index), self.duration(now), slo)

    def by_model(self, slo: dict[str, float], now: float, models: list[str]) -> dict[str, BenchmarkMetrics]:
        """The metrics of each model's requests (over the level's duration), in `models` order."""
        return compute_by_model(sorted(self.records, key=lambda r: r.index), self.duration(now), models, slo)


@dataclass
class RunSettings:
    base_url: str
    api_key: str | None = None
    request: RequestConfig = field(default_factory=RequestConfig)
    num_requests: int | None = 64
    duration: float | None = None
    burstiness: float = 1.0
    warmup: int | None = None  # requests sent first and left out; None: one per name of the mix
    seed: int = 0
    timeout: float = 600.0
    progress: bool = True
    # Names sent round-robin by request index ([]: request.model, else the server's first
    # listed id; ["all"]: every listed id); each must be one the server lists.
    models: list[str] = field(default_factory=list)


class Runner:
    def __init__(
        self,
        settings: RunSettings,
        loads: list[Load],
        samples_for: Callable[[int], list[Sample]],
        warmup_samples: list[Sample],
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.settings, self.loads, self.samples_for = settings, loads, samples_for
        self.warmup_samples, self.clock = warmup_samples, clock
        self.levels: list[Level] = []
        self.models: list[dict[str, Any]] = []  # the server's /v1/models entries
        self.mix: list[str | None] = []  # request i asks mix[i % len(mix)] (set by probe)
        self.warmup: int | None = settings.warmup  # resolved by probe when None

    def _http(self) -> httpx.AsyncClient:
        s = self.settings
        headers = {"Authorization": f"Bearer {s.api_key}"} if s.api_key else {}
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        return httpx.AsyncClient(
            base_url=s.base_url.rstrip("/"), headers=headers, timeout=s.timeout, limits=limits
        )

    async def probe(self, http: httpx.AsyncClient) -> None:
        """/v1/models answers with our key and lists the names asked for: else a BenchError
        saying what is wrong (UnknownModel for a name it does not list)."""
        url = self.settings.base_url
        try:
            r = await http.get("/v1/models", timeout=30)
        except httpx.HTTPError as e:
            raise BenchError(f"cannot reach the server at {url}: {e or type(e).__name__}") from None
        if r.status_code in (401, 403):
            raise BenchError(
                f"the server at {url} refused the request (HTTP {r.status_code}): "
                + ("wrong API key" if self.settings.api_key else "it needs --api-key (or MOLMO_API_KEY)")
            )
        if r.status_code != 200:
            raise BenchError(f"GET {url}/v1/models answered HTTP {r.status_code}: {r.text[:200]}")
        try:
            self.models = list(r.json()["data"])
        except (ValueError, KeyError, TypeError):
            raise BenchError(f"GET {url}/v1/models: not an OpenAI model list") from None
        s = self.settings
        asked = s.models or ([s.request.model] if s.request.model else [])
        self.mix = model_mix(asked, [m.get("id") for m in self.models], url)
        if self.warmup is None:  # one per name: an adapter's first request loads it
            self.warmup = len(self.mix)

    def request_for(self, i: int) -> RequestConfig:
        """Request i's settings: the run's, asking the mix's model i % len(mix)."""
        return replace(self.settings.request, model=self.mix[i % len(self.mix)])

    async def _warmup(self, http: httpx.AsyncClient) -> None:
        for i in range(self.warmup or 0):
            sample = self.warmup_samples[i % len(self.warmup_samples)]
            rec = await send(http, sample, self.request_for(i), -1 - i, self.clock(), self.clock)
            if rec.status is None:
                raise ServerGone(f"warm-up request failed: {rec.error}")
            if rec.status in (401, 403):
                raise BenchError(f"the server refused the request (HTTP {rec.status}): {rec.error}")

    async def _level(self, http: httpx.AsyncClient, level: Level, samples: list[Sample], bar: Any) -> None:
        s = self.settings
        failures = failed = 0  # connection failures in a row; failed requests in all
        gone = asyncio.Event()

        async def fire(i: int) -> RequestRecord:
            nonlocal failures, failed
            rec = await send(http, samples[i % len(samples)], self.request_for(i), i, level.started, self.clock)
            failures = failures + 1 if rec.status is None else 0
            failed += not rec.ok
            if failures >= GONE_AFTER:
                gone.set()
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"failed={failed}")
            return rec

        level.started = self.clock()
        task = asyncio.ensure_future(
            drive(fire, level.records, num_requests=s.num_requests, duration=s.duration,
                  rate=level.load.rate, burstiness=s.burstiness, concurrency=level.load.concurrency,
                  seed=s.seed, clock=self.clock)
        )  # fmt: skip
        waiter = asyncio.ensure_future(gone.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            level.ended = self.clock()
            waiter.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if gone.is_set():
            level.stopped = "server gone"
            raise ServerGone(f"the server at {s.base_url} stopped answering ({GONE_AFTER} connection failures in a row)")
        task.result()

    async def run(self) -> None:
        async with self._http() as http:
            await self.probe(http)
            await self._warmup(http)
            for n, load in enumerate(self.loads):
                level = Level(load)
                self.levels.append(level)
                bar = None
                if self.settings.progress:
                    from tqdm import tqdm

                    total = self.settings.num_requests if self.settings.duration is None else None
                    bar = tqdm(total=total, desc=load.label(), unit="req", leave=True)
                try:
                    await self._level(http, level, self.samples_for(n), bar)
                finally:
                    if bar is not None:
                        bar.close()
