"""Offline throughput of Molmo through vLLM (`vllm.LLM`, our plugin) on this machine.

For batches of 1, 8 and 32 requests it measures requests/s and output tokens/s of
* `image`: one distinct 640x480 image (7 crops, 740 image tokens) + a question per request;
* `text (baseline)`: text-only requests whose prompts have the same token count, in the
  same run and engine, so the difference is the image work (preprocessing, vision tower,
  placeholder handling);
and the prefill time of one 12-crop image (1000x750 -> 3x4 grid + global view, max_tokens=1,
median of a few distinct images) against a text-only prompt of the same length.
Every request has its own image and prefix caching is off, so no cache hides the work.

Prints a table and writes benchmarks/results/offline_<device>.json and .csv with the machine.

    VLLM_CPU_KVCACHE_SPACE=1 python benchmarks/offline.py [--model DIR] [--max-tokens 32]

Without --model a tiny random-weight checkpoint (`molmo init --preset tiny`) is written to
a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

# Run as a script, this folder comes first on sys.path and a module named like a package would
# shadow the `kernels` package: put the repository root there instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [q for q in sys.path if Path(q or ".").resolve() != _HERE]

from benchmarks.report import RESULTS, describe_machine, write_results  # noqa: E402

BATCHES = (1, 8, 32)
QUESTION = "Describe this image in detail."


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR)


def text_prompt_like(tok, n_tokens: int, seed: int) -> dict:
    """A text-only prompt of exactly n_tokens ids: BOS + filler words + the question."""
    from molmo_vllm.prompt import build_prompt

    tail = build_prompt(tok, QUESTION)["prompt_token_ids"][1:]
    rng = np.random.default_rng(seed)
    words = tok.encode(" the image shows a small red circle next to a large blue square")
    filler = [int(w) for w in rng.choice(words, size=max(0, n_tokens - 1 - len(tail)))]
    return {"prompt_token_ids": [tok.bos_id, *filler, *tail]}


def timed_generate(llm, prompts, params) -> tuple[float, list]:
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - t, outs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint folder (default: a fresh tiny checkpoint)")
    ap.add_argument("--max-tokens", type=int, default=32, help="output tokens per request")
    ap.add_argument("--prefill-reps", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from vllm import LLM, SamplingParams

    from molmo_model.checkpoint import init_checkpoint
    from molmo_model.preprocessing import image_grid, image_token_count
    from molmo_model.tokenizer import MolmoTokenizer
    from molmo_vllm.prompt import build_prompt

    info = describe_machine(with_vllm=True)
    tmp = None
    model_dir = a.model
    if model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="molmo-offline-")
        model_dir = str(init_checkpoint("tiny", Path(tmp.name) / "tiny", seed=0))
    tok = MolmoTokenizer.from_dir(model_dir)
    device = "gpu" if info["gpu"] else "cpu"

    t0 = time.perf_counter()
    llm = LLM(
        model=model_dir,
        enforce_eager=device == "cpu",
        dtype="float32" if device == "cpu" else "bfloat16",
        max_model_len=4096,
        max_num_seqs=max(BATCHES),
        enable_prefix_caching=False,
        limit_mm_per_prompt={"image": 1},
        seed=0,
    )
    info["engine_start_s"] = round(time.perf_counter() - t0, 1)
    params = SamplingParams(temperature=0.0, max_tokens=a.max_tokens, ignore_eos=True)

    w, h = 640, 480
    seed = 1000
    # Warm-up: first calls pay lazy initialisation.
    llm.generate(build_prompt(tok, QUESTION, [noise_image(w, h, 0)]), params, use_tqdm=False)

    rows: list[dict[str, object]] = []
    for batch in BATCHES:
        images = [noise_image(w, h, seed + i) for i in range(batch)]
        seed += batch
        prompts = [build_prompt(tok, QUESTION, [im]) for im in images]
        dt, outs = timed_generate(llm, prompts, params)
        n_prompt = len(outs[0].prompt_token_ids)
        n_out = sum(len(o.outputs[0].token_ids) for o in outs)
        rows.append(
            dict(
                workload="image 640x480",
                batch=batch,
                prompt_tokens=n_prompt,
                seconds=round(dt, 3),
                requests_per_s=round(batch / dt, 3),
                output_tokens_per_s=round(n_out / dt, 1),
            )
        )
        texts = [text_prompt_like(tok, n_prompt, seed + i) for i in range(batch)]
        dt, outs = timed_generate(llm, texts, params)
        n_out = sum(len(o.outputs[0].token_ids) for o in outs)
        rows.append(
            dict(
                workload="text (baseline)",
                batch=batch,
                prompt_tokens=len(outs[0].prompt_token_ids),
                seconds=round(dt, 3),
                requests_per_s=round(batch / dt, 3),
                output_tokens_per_s=round(n_out / dt, 1),
            )
        )

    # Prefill of one 12-crop image: 1000x750 gets a 3x4 grid (+ the global view = 13 crops).
    pw, ph = 1000, 750
    assert image_grid(pw, ph) == (3, 4)
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    image_times, text_times = [], []
    for r in range(a.prefill_reps):
        prompt = build_prompt(tok, QUESTION, [noise_image(pw, ph, 5000 + r)])
        dt, outs = timed_generate(llm, prompt, one)
        image_times.append(dt)
        n_prompt = len(outs[0].prompt_token_ids)
        dt, _ = timed_generate(llm, text_prompt_like(tok, n_prompt, 6000 + r), one)
        text_times.append(dt)
    prefill = {
        "image": f"{pw}x{ph}",
        "crops": 13,
        "image_tokens": image_token_count(pw, ph),
        "prompt_tokens": n_prompt,
        "image_prefill_ms_median": round(statistics.median(image_times) * 1e3, 1),
        "text_prefill_ms_median (baseline, same length)": round(
            statistics.median(text_times) * 1e3, 1
        ),
    }

    print(
        f"\nvLLM offline, {device}: {info['cpu']} x{info['cpu_count']} (load {info['load_average_at_start']})"
    )
    print(f"{'workload':<18}{'batch':>6}{'prompt':>8}{'req/s':>10}{'out tok/s':>12}")
    for r in rows:
        print(
            f"{r['workload']:<18}{r['batch']:>6}{r['prompt_tokens']:>8}{r['requests_per_s']:>10}"
            f"{r['output_tokens_per_s']:>12}"
        )
    print(json.dumps(prefill, indent=2))

    meta = {"baseline": "text (baseline)", "model": "tiny (random weights)" if a.model is None else a.model,
            "max_tokens": a.max_tokens, "prefill_12_crop": prefill}  # fmt: skip
    write_results(f"offline_{device}", rows, meta=meta, out_dir=a.out, machine=info)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
