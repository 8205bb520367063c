"""The metric math: per-request records in, one `BenchmarkMetrics` out (pure, no I/O).

Definitions follow `vllm bench serve` (vllm/benchmarks/serve.py), with TTFT meaning the first
*content*: a server that sends an empty role chunk early does not get an optimistic number.

- TTFT: request sent -> first chunk carrying text. `first_chunk` keeps the time to any first
  chunk (what `vllm bench serve` times) beside it.
- ITL: the gaps between successive text chunks of one request (all requests pooled).
- TPOT: per request (E2E - TTFT) / (output tokens - 1), for requests with > 1 token; a
  one-token request counts as TPOT 0 for goodput, as in vLLM.
- E2E: request sent -> response complete. Non-streamed requests (the point endpoint): E2E
  only, TTFT is not defined.
- Throughput: completed requests and output tokens (the server's `usage`, else text chunks)
  per second of the run (first request sent -> last response done; warm-up excluded).
- Goodput: completed requests meeting every given SLO (ttft_ms, tpot_ms, e2e_ms), per second.
- Percentiles: numpy's linear interpolation, as vLLM; all times reported in milliseconds.
- Pointing quality, where a sample carries truth: F1 of the answer's points against the true
  boxes and counting accuracy, scored by molmo_model.points as `molmo eval` scores them.
- Per model (a run that mixes model names: a base and its LoRA adapters): the same metrics
  over each model's requests, with the level's duration, so that the models' throughputs add
  up to the level's.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """One request's outcome; every time is seconds, relative to the run's start."""

    index: int
    image_id: str = ""
    first_of_image: bool = True
    task: str | None = None
    start: float = 0.0  # when it was sent
    model: str | None = None  # the `model` it asked for (None: none sent, the server's default)
    ok: bool = False
    status: int | None = None  # HTTP status; None when no response came (connection error)
    error: str | None = None
    first_chunk: float | None = None  # s after start: first SSE chunk of any kind
    ttft: float | None = None  # s after start: first chunk with text
    itl: list[float] = field(default_factory=list)  # s between successive text chunks
    e2e: float | None = None  # s after start: response complete
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    text: str = ""
    num_points: int | None = None
    f1: float | None = None  # pointing F1 against the sample's boxes
    count_correct: bool | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"tpot": self.tpot}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RequestRecord:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class Stats:
    """Milliseconds over a set of values (NaN when there are none)."""

    count: int
    mean: float
    std: float
    median: float
    p90: float
    p99: float

    @classmethod
    def of(cls, seconds: list[float]) -> Stats:
        if not seconds:
            return cls(0, *([math.nan] * 5))
        ms = np.asarray(seconds, dtype=np.float64) * 1000.0
        p50, p90, p99 = (float(v) for v in np.percentile(ms, PERCENTILES))
        return cls(len(ms), float(ms.mean()), float(ms.std()), p50, p90, p99)


@dataclass
class BenchmarkMetrics:
    """The summary of one run (one load level)."""

    completed: int
    failed: int
    errors_by_status: dict[str, int]  # "500": 3, "connection": 1
    duration_s: float
    request_throughput: float  # completed requests / s
    output_throughput: float  # output tokens / s
    total_input_tokens: int
    total_output_tokens: int
    ttft_ms: Stats
    first_chunk_ms: Stats
    tpot_ms: Stats
    itl_ms: Stats
    e2e_ms: Stats
    ttft_first_question_ms: Stats  # the first question about an image
    ttft_later_question_ms: Stats  # later questions about the same image (prefix cache)
    slo: dict[str, float]
    good_completed: int
    goodput: float  # requests / s meeting every SLO (= request_throughput when none given)
    points_per_s: float
    pointing_f1: float | None  # mean over completed requests with true boxes
    pointing_queries: int
    counting_accuracy: float | None
    counting_queries: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


SLO_KEYS = ("ttft_ms", "tpot_ms", "e2e_ms")


def parse_slo(text: str | None) -> dict[str, float]:
    """'ttft_ms=500,e2e_ms=2000' -> {"ttft_ms": 500.0, "e2e_ms": 2000.0}."""
    slo: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, _, value = part.partition("=")
        if key not in SLO_KEYS:
            raise ValueError(f"--slo: unknown key {key!r}; use {', '.join(SLO_KEYS)}")
        try:
            slo[key] = float(value)
        except ValueError:
            raise ValueError(f"--slo: {key} needs a number of milliseconds, got {value!r}") from None
        if slo[key] <= 0:
            raise ValueError(f"--slo: {key} must be > 0")
    return slo


def _meets(r: RequestRecord, slo: dict[str, float]) -> bool:
    values = {"ttft_ms": r.ttft, "tpot_ms": r.tpot or 0.0, "e2e_ms": r.e2e}
    return all(values[k] is not None and values[k] * 1000.0 <= limit for k, limit in slo.items())


def compute_metrics(
    records: list[RequestRecord], duration_s: float, slo: dict[str, float] | None = None
) -> BenchmarkMetrics:
    """The summary of `records` (warm-up already left out) over a run of `duration_s`."""
    slo = dict(slo or {})
    done = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    # No response: "connection"; an error after a 200 (mid-stream): "stream"; else the status.
    errors = Counter(
        "connection" if r.status is None else "stream" if r.status == 200 else str(r.status)
        for r in failed
    )
    per_s = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: 0.0)
    out_tokens = sum(r.output_tokens or 0 for r in done)
    good = sum(_meets(r, slo) for r in done)
    pointed = [r.f1 for r in done if r.f1 is not None]
    counted = [r.count_correct for r in done if r.count_correct is not None]
    ttfts = [r for r in done if r.ttft is not None]
    return BenchmarkMetrics(
        completed=len(done),
        failed=len(failed),
        errors_by_status=dict(sorted(errors.items())),
        duration_s=duration_s,
        request_throughput=per_s(len(done)),
        output_throughput=per_s(out_tokens),
        total_input_tokens=sum(r.prompt_tokens or 0 for r in done),
        total_output_tokens=out_tokens,
        ttft_ms=Stats.of([r.ttft for r in ttfts]),
        first_chunk_ms=Stats.of([r.first_chunk for r in done if r.first_chunk is not None]),
        tpot_ms=Stats.of([t for r in done if (t := r.tpot) is not None]),
        itl_ms=Stats.of([g for r in done for g in r.itl]),
        e2e_ms=Stats.of([r.e2e for r in done if r.e2e is not None]),
        ttft_first_question_ms=Stats.of([r.ttft for r in ttfts if r.first_of_image]),
        ttft_later_question_ms=Stats.of([r.ttft for r in ttfts if not r.first_of_image]),
        slo=slo,
        good_completed=good,
        goodput=per_s(good),
        points_per_s=per_s(sum(r.num_points or 0 for r in done)),
        pointing_f1=float(np.mean(pointed)) if pointed else None,
        pointing_queries=len(pointed),
        counting_accuracy=float(np.mean(counted)) if counted else None,
        counting_queries=len(counted),
    )


def compute_by_model(
    records: list[RequestRecord], duration_s: float, models: list[str], slo: dict[str, float] | None = None
) -> dict[str, BenchmarkMetrics]:
    """`compute_metrics` over each model's requests, in the order of `models`, each over the
    whole level's `duration_s` (the models share it: their throughputs add up)."""
    return {name: compute_metrics([r for r in records if r.model == name], duration_s, slo) for name in models}
