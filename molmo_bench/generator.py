"""When requests are sent: an open loop (arrivals at a rate) or a closed loop (C in flight).

- Open loop, `--request-rate R`: arrival gaps drawn from a gamma distribution with shape
  `burstiness` and mean 1/R, as `vllm bench serve` does. burstiness 1 is a Poisson process;
  below 1 arrivals come in bursts, above 1 more evenly. R = inf sends everything at once.
  `--concurrency C` with a rate caps the requests in flight at C.
- Closed loop, `--concurrency C` alone: C workers, each sends its next request when its last
  one is answered.

Either stops after `num_requests` or, with `duration`, sends no new request once `duration`
seconds have passed (samples are cycled). `drive` appends each finished record to the list
it is given, so whatever finished is there even if the run is cancelled part-way.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Awaitable, Callable, Iterator

import numpy as np

from molmo_bench.metrics import RequestRecord


def arrival_gaps(rate: float, burstiness: float, seed: int) -> Iterator[float]:
    """Endless gaps (seconds) between arrivals: gamma(shape=burstiness, mean=1/rate); the
    first request goes at once."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError("request rate and burstiness must be > 0")
    yield 0.0
    if math.isinf(rate):
        yield from itertools.repeat(0.0)
    rng = np.random.default_rng(seed)
    theta = 1.0 / (rate * burstiness)
    while True:
        yield float(rng.gamma(burstiness, theta))


async def drive(
    fire: Callable[[int], Awaitable[RequestRecord]],
    records: list[RequestRecord],
    *,
    num_requests: int | None,
    duration: float | None = None,
    rate: float | None = None,
    burstiness: float = 1.0,
    concurrency: int | None = None,
    seed: int = 0,
    clock: Callable[[], float],
) -> None:
    """Sends requests 0, 1, ... through `fire(index)` until `num_requests` are sent or
    `duration` seconds have passed; returns when all that were sent have finished."""
    if num_requests is None and duration is None:
        raise ValueError("give --num-requests or --duration")
    if rate is None and concurrency is None:
        raise ValueError("give --request-rate or --concurrency")
    t0 = clock()

    def more(i: int) -> bool:
        if num_requests is not None and i >= num_requests:
            return False
        return duration is None or clock() - t0 < duration

    async def one(i: int, gate: asyncio.Semaphore | None) -> None:
        try:
            records.append(await fire(i))
        finally:
            if gate is not None:
                gate.release()

    if rate is None:  # closed loop
        counter = itertools.count()

        async def worker() -> None:
            while more(i := next(counter)):
                records.append(await fire(i))

        await asyncio.gather(*(worker() for _ in range(concurrency or 1)))
        return

    gate = asyncio.Semaphore(concurrency) if concurrency else None
    tasks: set[asyncio.Task] = set()
    due = 0.0
    try:
        for i, gap in enumerate(arrival_gaps(rate, burstiness, seed)):
            due += gap
            wait = due - (clock() - t0)
            if wait > 0:
                await asyncio.sleep(wait)
            if not more(i):
                break
            if gate is not None:
                await gate.acquire()
            task = asyncio.create_task(one(i, gate))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
