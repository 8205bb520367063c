"""Throughput of the base alone against a mixed load of the base and 1 or 4 LoRA adapters.

One tiny random-weight checkpoint and four random rank-8 adapters of it (PEFT format,
molmo_model.lora; every decoder target adapted, lora_B drawn non-zero so that each adapter
answers differently). An adapter is kept only if its greedy answers (PyTorch reference, the
merged weights) are whole characters: a run of byte tokens that form no UTF-8 is held back
by the server's detokenizer, and such requests would show their first text with their last
token (a late TTFT, a TPOT of ~0) whatever the server's speed.

`molmo serve` is started once per server run, one at a time (float32, eager), and
`molmo bench serve` drives it at fixed concurrency with the same request shape every time
(one synthetic WxH image with a pointing or counting question, --max-tokens generated with
ignore_eos, so every request produces exactly that many tokens):

    server run  flags                                 bench cases (--model)
    base        none (LoRA off)                       base: tiny  (the baseline)
    lora1       --lora-modules a --max-loras 1        lora1_base_only: tiny;  mix1: tiny,a
    lora4       --lora-modules a b c d --max-loras 4  lora4_base_only: tiny;  mix4: tiny,a,b,c,d

The `_base_only` cases (LoRA enabled, base requests only) separate what enabling LoRA costs
from what mixing adapters into the batches costs: base -> lora1_base_only is the first,
lora1_base_only -> mix1 the second (the same server start). Request i asks models[i % n], so
every mix is even. `molmo bench` warms up once per model (an adapter's first request loads
it); every bench call gets its own synthetic images (seed), so none is served from an
earlier one's prefix cache.

The machine may be shared, so each server start runs its cases --repeats times, alternating
(base_only, mix, base_only, mix, ...), each bench call records the load average when it
starts, and --runs repeats server starts (default base lora1 lora4 base lora4: the baseline
and the 4-adapter server twice, interleaved, to show the noise). Per case the median over
its calls is compared (output tokens/s, and the medians of the calls' TTFT/TPOT/E2E medians):
on a machine loaded all along by other jobs one lucky call makes a best-of meaningless; the
best call and every call's tokens/s are kept beside it. The mix cases also get the median
ratio to the base-only call just before each of them on the same server start.

    python benchmarks/lora_mix.py [--runs base lora1 lora4 base lora4] [--repeats 3]
        [--num-requests 64] [--concurrency 8] [--max-tokens 32] [--image-size 336x336]

Writes OUT/lora_mix_<cpu|gpu>.json (settings, the commands, every bench call's summary with
its per-model breakdown and load average, the machine) and .csv (one line per case: output
tokens/s, its ratios to the base alone, TTFT/TPOT/E2E medians); OUT is --out, by default
benchmarks/results. About 6 minutes on a loaded 2-core CPU, most of it five server starts.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(ROOT)] + [q for q in sys.path if Path(q or ".").resolve() != _HERE]

from benchmarks.bench_vs_vllm import molmo_bench, ratio  # noqa: E402
from benchmarks.report import RESULTS, describe_machine, write_results  # noqa: E402
from benchmarks.servers import SERVED_NAME, ServerProcess, free_port, server_command  # noqa: E402
from molmo_model.lora import LoRAConfig  # noqa: E402

ADAPTERS = ("a", "b", "c", "d")
RANK = 8
# server run -> (adapters loaded, --max-loras); None: LoRA off
SERVERS = {"base": None, "lora1": (ADAPTERS[:1], 1), "lora4": (ADAPTERS, 4)}
# server run -> its bench cases, (case, the models the requests ask in turn)
CASES = {
    "base": [("base", [SERVED_NAME])],
    "lora1": [("lora1_base_only", [SERVED_NAME]), ("mix1", [SERVED_NAME, "a"])],
    "lora4": [("lora4_base_only", [SERVED_NAME]), ("mix4", [SERVED_NAME, *ADAPTERS])],
}
BASELINE = "base"


def make_adapters(model_dir: Path, out: Path, image_size: tuple[int, int], max_tokens: int) -> dict[str, Path]:
    """Random rank-RANK adapters of the checkpoint, one per name, each from the first seed
    whose greedy answers to two synthetic requests are whole characters."""
    import base64
    import io

    import torch
    from PIL import Image

    from molmo_bench.datasets import load_dataset
    from molmo_model.checkpoint import load_checkpoint
    from molmo_model.generate import generate
    from molmo_model.lora import add_lora, lora_modules, merge_lora, save_adapter
    from molmo_model.preprocessing import MolmoPreprocessor

    base, _, tok = load_checkpoint(model_dir)
    pre = MolmoPreprocessor(base.config.preprocess, tok)
    prompts = []
    for s in load_dataset("synthetic", num_images=2, image_size=image_size, seed=0):
        image = Image.open(io.BytesIO(base64.b64decode(s.image_url.split(",", 1)[1])))
        prompts.append(pre.build_prompt([{"role": "user", "content": s.question}], [image]))
    config = LoRAConfig(rank=RANK, alpha=2.0 * RANK)
    paths: dict[str, Path] = {}
    seeds = iter(range(1, 100))
    for name in ADAPTERS:
        for seed in seeds:
            model = copy.deepcopy(base)
            add_lora(model, config, seed=seed)
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():  # B drawn, not zero: the adapter changes the answers
                for m in lora_modules(model).values():
                    m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * 0.3)
            merged = merge_lora(copy.deepcopy(model)).eval()
            answers = [tok.decode(generate(merged, ids, crops, max_tokens).tokens) for ids, crops in prompts]
            if all(a and "\ufffd" not in a for a in answers):  # no eos: ignore_eos, as the bench
                paths[name] = save_adapter(model, config, out / name)
                print(f"adapter {name}: seed {seed}, answers {[a[:24] for a in answers]}", flush=True)
                break
        else:
            raise RuntimeError("no seed in 1..99 gave adapters whose answers are whole characters")
    return paths


def server_flags(run: str, adapters: dict[str, Path]) -> list[str]:
    lora = SERVERS[run]
    if lora is None:
        return []
    names, max_loras = lora
    return ["--lora-modules", *(f"{n}={adapters[n]}" for n in names),
            "--max-loras", str(max_loras), "--max-lora-rank", str(RANK)]  # fmt: skip


def summary(run: dict, load_average: list[float]) -> dict:
    """One bench case's numbers from its `molmo bench serve` result."""
    level = run["levels"][0]
    m = level["metrics"]
    out = {"output_tok_s": m["output_throughput"], "req_s": m["request_throughput"],
           "ttft_median_ms": m["ttft_ms"]["median"], "tpot_median_ms": m["tpot_ms"]["median"],
           "e2e_median_ms": m["e2e_ms"]["median"], "completed": m["completed"], "failed": m["failed"],
           "load_average_at_start": load_average}  # fmt: skip
    if "by_model" in level:
        out["by_model"] = {name: {"completed": x["completed"], "output_tok_s": x["output_throughput"],
                                  "ttft_median_ms": x["ttft_ms"]["median"], "tpot_median_ms": x["tpot_ms"]["median"]}
                           for name, x in level["by_model"].items()}  # fmt: skip
    return out


def same_start_ratio(calls: list[dict], case: str) -> float | None:
    """Median, over the alternating pairs of each server start, of `case`'s tokens/s over the
    start's base-only call just before it: what mixing costs, seen through the least noise."""
    ratios = []
    for start in dict.fromkeys(c["start"] for c in calls if c["case"] == case):
        mine = [c for c in calls if c["start"] == start and c["case"] == case]
        base = [c for c in calls if c["start"] == start and c["case"].endswith("_base_only")]
        ratios += [m["output_tok_s"] / b["output_tok_s"] for b, m in zip(base, mine, strict=False)]
    return round(statistics.median(ratios), 3) if ratios else None


KEYS = ("output_tok_s", "ttft_median_ms", "tpot_median_ms", "e2e_median_ms")


def case_rows(calls: list[dict]) -> list[dict]:
    """Per case, the median over its calls of each of KEYS, the ratios to the baseline's, and
    the best call's tokens/s (and its ratio to the baseline's best)."""
    by_case: dict[str, list[dict]] = {}
    for r in calls:
        by_case.setdefault(r["case"], []).append(r)
    med = {case: {k: statistics.median(r[k] for r in rs) for k in KEYS} for case, rs in by_case.items()}
    best = {case: max(r["output_tok_s"] for r in rs) for case, rs in by_case.items()}
    base = med.get(BASELINE)
    rows = []
    for case, rs in by_case.items():
        m = med[case]
        rows.append({
            "case": case, "server": rs[0]["server"], "models": ",".join(rs[0]["models"]), "calls": len(rs),
            "output_tok_s": round(m["output_tok_s"], 1),
            "ratio_to_base": ratio(m["output_tok_s"], base["output_tok_s"]) if base else None,
            "ratio_to_base_only_same_start": None if case.endswith("_base_only") else same_start_ratio(calls, case),
            "ttft_median_ms": round(m["ttft_median_ms"], 1), "tpot_median_ms": round(m["tpot_median_ms"], 2),
            "e2e_median_ms": round(m["e2e_median_ms"], 1),
            "ttft_ratio_to_base": ratio(m["ttft_median_ms"], base["ttft_median_ms"]) if base else None,
            "tpot_ratio_to_base": ratio(m["tpot_median_ms"], base["tpot_median_ms"]) if base else None,
            "output_tok_s_best": round(best[case], 1),
            "ratio_to_base_best": ratio(best[case], best[BASELINE]) if base else None,
            "output_tok_s_calls": [round(r["output_tok_s"], 1) for r in rs],
            "load_average_at_start": [r["load_average_at_start"][0] for r in rs],
            "failed": sum(r["failed"] for r in rs),
        })  # fmt: skip
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"\n{'case':<15} {'models':<12} {'calls':>5} {'out tok/s':>9} {'x base':>6} {'x base-only':>11}"
          f" {'TTFT p50 ms':>11} {'TPOT p50 ms':>11} {'E2E p50 ms':>10}  tok/s of each call (load avg 1 min)")  # fmt: skip
    print("(medians over the calls; x base-only: the mix against the base-only call before it, same start)")
    for r in rows:
        each = ", ".join(f"{t} ({la})" for t, la in zip(r["output_tok_s_calls"], r["load_average_at_start"], strict=True))
        print(f"{r['case']:<15} {r['models']:<12} {r['calls']:>5} {r['output_tok_s']:>9.1f} {r['ratio_to_base']!s:>6}"
              f" {r['ratio_to_base_only_same_start'] or '-'!s:>11} {r['ttft_median_ms']:>11.1f}"
              f" {r['tpot_median_ms']:>11.2f} {r['e2e_median_ms']:>10.1f}  {each}")  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", choices=list(SERVERS), default=["base", "lora1", "lora4", "base", "lora4"],
                   help="server runs in order, each one start (default: %(default)s)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=3, help="passes over a server's cases per start")
    p.add_argument("--model", help="checkpoint folder (default: a fresh tiny checkpoint)")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--image-size", default="336x336", help="WxH")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--out", type=Path, default=RESULTS, help="result folder (default: %(default)s)")
    a = p.parse_args()
    a.image_size = tuple(int(v) for v in a.image_size.split("x"))
    tmp = Path(tempfile.mkdtemp(prefix="lora_mix_"))
    model = a.model
    if model is None:
        from molmo_model.checkpoint import init_checkpoint

        model = str(init_checkpoint("tiny", tmp / "tiny"))
    adapters = make_adapters(Path(model), tmp / "adapters", a.image_size, a.max_tokens)
    machine = describe_machine(with_vllm=True)
    common = ["--max-model-len", str(a.max_model_len), "--max-num-seqs", "32", "--dtype", "float32"]
    if machine["gpu"] is None:
        common.append("--enforce-eager")
    t0 = time.monotonic()
    calls = []
    for k, run in enumerate(a.runs):
        port = free_port()
        cmd = [*server_command("ours", model, common), *server_flags(run, adapters), "--port", str(port)]
        with ServerProcess(run, cmd, port, tmp / f"{run}.{k}.log") as server:
            plan = [case for _ in range(a.repeats) for case in CASES[run]]  # cases alternating
            for seed, (case, models) in enumerate(plan):  # seed: new images for every call
                load = ["--concurrency", str(a.concurrency), "--model", ",".join(models)]
                load_average = [round(x, 2) for x in os.getloadavg()]
                result = molmo_bench(server.url, a, tmp, load, f"{case}_{k}_{seed}", seed=seed)
                calls.append({"case": case, "server": run, "start": k, "models": models,
                             **summary(result, load_average)})  # fmt: skip
                print(f"{run} #{k} {case}: {json.dumps(calls[-1])}", flush=True)
    rows = case_rows(calls)
    print_rows(rows)
    w, h = a.image_size
    bench_argv = ["molmo", "bench", "serve", "--num-requests", str(a.num_requests), "--max-tokens", str(a.max_tokens),
                  "--ignore-eos", "--image-size", f"{w}x{h}", "--question", "Describe.",
                  "--concurrency", str(a.concurrency), "--model", "MODELS"]  # fmt: skip
    meta = {
        "settings": {k: v for k, v in vars(a).items() if k != "out"} | {"model": a.model or "tiny (random weights)"},
        "baseline": "base: the same checkpoint served with LoRA off, base requests only",
        "adapters": {"count": len(ADAPTERS), "rank": RANK, "targets": list(LoRAConfig().targets)},
        "server_command": ["molmo", "serve", *server_command("ours", "CHECKPOINT", common)[3:]],  # after "python -m server"
        "server_lora_flags": {run: server_flags(run, {n: Path(n.upper() + "_DIR") for n in ADAPTERS}) for run in SERVERS},
        "bench_command": bench_argv,
        "wall_time_s": round(time.monotonic() - t0, 1),
        "calls": calls,
    }  # fmt: skip
    write_results(f"lora_mix_{'gpu' if machine['gpu'] else 'cpu'}", rows, meta=meta, out_dir=a.out, machine=machine)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
