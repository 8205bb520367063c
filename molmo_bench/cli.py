"""`molmo bench serve` (a load run against an endpoint) and `molmo bench compare A.json B.json`.

    molmo bench serve --base-url http://127.0.0.1:8000 --dataset synthetic --num-requests 64 \
        --concurrency 8 --max-tokens 32 --slo ttft_ms=500,e2e_ms=3000 --out bench/
    molmo bench serve --endpoint point --dataset rows.jsonl --sweep rate=0.5,1,2 --duration 60
    molmo bench serve --model base,pets,tools ...   # request i asks the i % 3-th (LoRA adapters)
    molmo bench compare ours/bench.json vllm/bench.json --out cmp/

Exit codes: 0 done; 1 the server was unreachable, refused the key or went away mid-run, or
no request succeeded (what was measured is written); 2 bad usage, a --model the server does
not list included; 130 Ctrl-C (what was measured is written).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from molmo_bench.client import RequestConfig
from molmo_bench.datasets import DatasetError, load_dataset, parse_size
from molmo_bench.metrics import parse_slo
from molmo_bench.report import compare, describe_client_machine, summary_table, write_run
from molmo_bench.runner import (
    ALL_MODELS,
    BenchError,
    Load,
    Runner,
    RunSettings,
    ServerGone,
    UnknownModel,
)


def _rate(text: str) -> float:
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (or inf), got {text}")
    return v


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return v


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="molmo bench serve", description="Load-test an OpenAI-compatible Molmo endpoint.")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (without /v1)")
    p.add_argument("--api-key", default=os.environ.get("MOLMO_API_KEY"), help="or MOLMO_API_KEY")
    p.add_argument("--model", help="model name to send (default: the server's first /v1/models entry); "
                   "a comma-separated mix (base,a,b: request i asks the (i %% 3)-th, at every level) "
                   f"or '{ALL_MODELS}' (every id the server lists) for a base and its LoRA adapters")  # fmt: skip
    p.add_argument("--endpoint", choices=["chat", "point"], default="chat",
                   help="chat: streamed /v1/chat/completions; point: /v1/point")  # fmt: skip
    p.add_argument("--dataset", default="synthetic", help="synthetic, a folder of images, or FILE.jsonl")
    p.add_argument("--question", default="Point to all the red circles.", help="folder datasets: the chat question")
    p.add_argument("--object", default="red circles", help="folder datasets: what /v1/point looks for")
    p.add_argument("--num-requests", type=_positive, help="requests per level (default 64 without --duration)")
    p.add_argument("--duration", type=float, help="seconds per level: no new request after it")
    p.add_argument("--request-rate", type=_rate, help="open loop: requests/s (Poisson; 'inf': all at once)")
    p.add_argument("--burstiness", type=_rate, default=1.0, help="gamma shape of arrival gaps (1: Poisson)")
    p.add_argument("--concurrency", type=_positive, help="closed loop: requests in flight (with a rate: a cap)")
    p.add_argument("--sweep", help="levels: concurrency=1,8,32 or rate=0.5,1,2")
    p.add_argument("--max-tokens", type=_positive, default=32)
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens (vLLM extension)")
    p.add_argument("--image-size", default="640x480", help="synthetic images: WxH")
    p.add_argument("--questions-per-image", type=_positive, default=1, help="K questions per image (prefix cache)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo", help="goodput SLOs: ttft_ms=..,tpot_ms=..,e2e_ms=..")
    p.add_argument("--warmup", type=int,
                   help="requests sent first and left out (default: 1 per model of the mix, so 1 for one)")  # fmt: skip
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--out", default="bench-results", help="output folder")
    p.add_argument("--name", default="bench", help="file name stem of the outputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def loads_of(a: argparse.Namespace, p: argparse.ArgumentParser) -> list[Load]:
    if not a.sweep:
        if a.request_rate is None and a.concurrency is None:
            return [Load(concurrency=1)]
        return [Load(a.request_rate, a.concurrency)]
    axis, _, values = a.sweep.partition("=")
    try:
        if axis == "concurrency":
            levels = [int(v) for v in values.split(",")]
            if min(levels) < 1:
                raise ValueError
            return [Load(a.request_rate, c) for c in levels]
        if axis == "rate":
            rates = [float(v) for v in values.split(",")]
            if min(rates) <= 0:
                raise ValueError
            return [Load(r, a.concurrency) for r in rates]
    except ValueError:
        pass
    p.error(f"--sweep: expected concurrency=1,8,32 or rate=0.5,1,2 (positive numbers), got {a.sweep!r}")
    raise AssertionError  # p.error exits


def model_names(text: str | None) -> list[str]:
    """--model 'base,a,b' -> ["base", "a", "b"]; ValueError for an empty name or a mixed 'all'."""
    if text is None:
        return []
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise ValueError(f"--model: an empty name in {text!r}")
    if ALL_MODELS in names and len(names) > 1:
        raise ValueError(f"--model: {ALL_MODELS!r} (every id the server lists) stands alone, got {text!r}")
    return names


def _result(a: argparse.Namespace, runner: Runner, slo: dict[str, float], status: str, message: str | None, machine: dict[str, Any]) -> dict[str, Any]:
    now = runner.clock()
    mixed = list(dict.fromkeys(runner.mix)) if len(set(runner.mix)) > 1 else []
    levels = []
    for lv in runner.levels:
        load = {"label": lv.load.label(), "rate": lv.load.rate, "concurrency": lv.load.concurrency}
        level = {"load": load, "stopped": lv.stopped, "metrics": lv.metrics(slo, now).as_dict()}
        if mixed:  # the breakdown of a mix: each model's requests, over the level's duration
            level["by_model"] = {name: m.as_dict() for name, m in lv.by_model(slo, now, mixed).items()}
        level["requests"] = [r.as_dict() for r in sorted(lv.records, key=lambda r: r.index)]
        levels.append(level)
    settings = {k: v for k, v in vars(a).items() if k not in ("api_key", "no_progress")}
    settings["warmup"] = runner.warmup  # resolved: one per model of the mix unless given
    settings["model_mix"] = runner.mix  # request i asked model_mix[i % len]
    settings["request_rate"] = None if a.request_rate is None else (str(a.request_rate) if math.isinf(a.request_rate) else a.request_rate)
    return {"benchmark": "molmo bench serve", "status": status, "message": message,
            "settings": settings, "server": {"base_url": a.base_url, "models": runner.models},
            "machine": machine, "levels": levels}  # fmt: skip


def serve(argv: list[str]) -> int:
    p = serve_parser()
    a = p.parse_args(argv)
    try:
        size = parse_size(a.image_size)
        slo = parse_slo(a.slo)
        if a.duration is not None and a.duration <= 0:
            raise ValueError("--duration must be > 0")
        if a.warmup is not None and a.warmup < 0:
            raise ValueError("--warmup must be >= 0")
        if a.num_requests is None and a.duration is None:
            a.num_requests = 64
        models = model_names(a.model)
        loads = loads_of(a, p)
        k = a.questions_per_image
        n_images = math.ceil(a.num_requests / k) if a.num_requests else 64

        def samples_for(level: int) -> list:
            # Synthetic: new images per level, so no level finds the last one's in a cache.
            return load_dataset(a.dataset, num_images=n_images, image_size=size, seed=a.seed + 1009 * level,
                                questions_per_image=k, question=a.question, obj=a.object)  # fmt: skip

        first = samples_for(0)
        warm = load_dataset(a.dataset, num_images=1, image_size=size, seed=a.seed + 999_983,
                            question=a.question, obj=a.object) if a.dataset == "synthetic" else first[-1:]  # fmt: skip
    except (ValueError, DatasetError) as e:
        p.error(str(e))
    cache = {0: first}
    settings = RunSettings(
        a.base_url, a.api_key, RequestConfig(a.endpoint, None, a.max_tokens, ignore_eos=a.ignore_eos),
        a.num_requests, a.duration, a.burstiness, a.warmup, a.seed, a.timeout, not a.no_progress, models,
    )  # fmt: skip

    def samples_at(level: int) -> list:
        if a.dataset != "synthetic":  # a folder or a file: the same samples at every level
            return first
        return cache.get(level) or samples_for(level)

    runner = Runner(settings, loads, samples_at, warm)
    machine = describe_client_machine()
    status, message, code = "complete", None, 0
    t0 = time.time()
    try:
        asyncio.run(runner.run())
    except KeyboardInterrupt:
        status, message, code = "interrupted", "stopped by Ctrl-C: the results hold what was measured", 130
    except ServerGone as e:
        status, message, code = "server_gone", str(e), 1
    except UnknownModel as e:  # bad usage, known only once the server answered
        status, message, code = "failed", str(e), 2
    except BenchError as e:
        status, message, code = "failed", str(e), 1
    result = _result(a, runner, slo, status, message, machine)
    result["wall_time_s"] = round(time.time() - t0, 3)
    if code == 0 and not any(lv["metrics"]["completed"] for lv in result["levels"]):
        status = result["status"] = "no_success"
        message = result["message"] = "no request succeeded (see errors_by_status and the requests' errors)"
        code = 1
    paths = write_run(result, Path(a.out), a.name)
    if result["levels"]:
        print(summary_table(result))
        for lv in result["levels"]:
            if lv["metrics"]["errors_by_status"]:
                print(f"errors at {lv['load']['label']}: {lv['metrics']['errors_by_status']}")
    if message:
        print(f"molmo bench: {message}", file=sys.stderr)
    print(f"wrote {', '.join(str(q) for q in paths)}")
    return code


def _load_run(path: str, p: argparse.ArgumentParser) -> dict[str, Any]:
    try:
        run = json.loads(Path(path).read_text())
        run["levels"][0]["metrics"]  # noqa: B018  (the shape a bench JSON has)
        return run
    except FileNotFoundError:
        p.error(f"{path}: no such file")
    except (ValueError, KeyError, IndexError, TypeError):
        p.error(f"{path}: not a `molmo bench serve` result (JSON with levels and metrics)")
    raise AssertionError


def compare_cmd(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="molmo bench compare", description="Two bench runs side by side.")
    p.add_argument("a", help="run A (bench.json)")
    p.add_argument("b", help="run B (bench.json)")
    p.add_argument("--out", help="folder for compare.json and compare.png")
    a = p.parse_args(argv)
    run_a, run_b = _load_run(a.a, p), _load_run(a.b, p)
    print(f"A: {a.a} ({run_a['server']['base_url']})\nB: {a.b} ({run_b['server']['base_url']})\n")
    print(compare(run_a, run_b, Path(a.out) if a.out else None))
    return 0


def bench(argv: list[str]) -> int:
    """`molmo bench serve ...` or `molmo bench compare A.json B.json`."""
    if argv and argv[0] == "serve":
        return serve(argv[1:])
    if argv and argv[0] == "compare":
        return compare_cmd(argv[1:])
    print(__doc__.strip(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
    return 0 if argv and argv[0] in ("-h", "--help") else 2
