"""Molmo-7B-D shapes served through vLLM (our plugin) on one GPU: decode and TTFT.

1. Writes a random-weight checkpoint with the real `molmo-7b-d` shapes (8 B parameters) in
   bf16: every tensor is generated on the device and written with safetensors to local disk
   (Ai2 names, sharded, config.json, our tokenizer sized to Molmo's 152064 + 128 ids).
2. Starts `vllm.LLM` on it (torch.compile + CUDA graphs unless --eager; if that start fails
   it retries once in eager mode with the PyTorch pooling, and records why).
3. Measures
   - decode tokens/s at batch 1: (time of N+1 tokens - time of 1 token) / N, text prompt,
     against the named baseline `bandwidth_bound_tok_s` = measured device copy bandwidth /
     bytes of the decoder weights read per token (blocks, ln_f, head; ~212 tok/s on an H100);
   - TTFT of one 12-crop image (1000x750 -> 3x4 grid + global view, max_tokens=1, distinct
     images, median), against a text-only prompt of the same token count (baseline).

    python benchmarks/gpu_7b.py                                # GPU (about 4-6 minutes)
    python benchmarks/gpu_7b.py --preset tiny --device cpu     # dry run of the code path

Prints JSON and writes gpu_7b_<device>.json/.csv to $OUT when set, else to benchmarks/results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# Run as a script, this folder comes first on sys.path and a module named like a package would
# shadow the `kernels` package: put the repository root there instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [q for q in sys.path if Path(q or ".").resolve() != _HERE]

from benchmarks.report import RESULTS, describe_machine, write_results  # noqa: E402
from molmo_model.config import MolmoConfig, get_preset  # noqa: E402
from molmo_model.tokenizer import build_tokenizer  # noqa: E402

QUESTION = "Describe this image in detail."
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# 1. Checkpoint
# ---------------------------------------------------------------------------------------------


def _init_tensor(name: str, shape: torch.Size, gen: torch.Generator, device, dtype, std: float):
    if name.endswith("pad_embed") or name.endswith(".bias"):
        return torch.zeros(shape, device=device, dtype=dtype)
    if len(shape) == 1 and ("norm" in name or "ln" in name):
        return torch.ones(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(std)


def write_checkpoint(
    cfg: MolmoConfig, out: Path, device: torch.device, std: float = 0.02, shard_bytes: int = 4 << 30
) -> dict[str, float]:
    """Random bf16 weights generated on `device`, written shard by shard (Ai2 names)."""
    from safetensors.torch import save_file

    from molmo_model.model import MolmoForCausalLM

    t = time.perf_counter()
    tok = build_tokenizer(vocab_size=cfg.llm.embedding_size)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in MolmoForCausalLM(cfg).state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * 2
        if shards[-1] and sizes[-1] + nbytes > shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = _init_tensor(name, shape, gen, device, dtype, std)
        sizes[-1] += nbytes
    sync(device)
    gen_s = time.perf_counter() - t
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(
            {k: v.cpu() for k, v in shard.items()}, str(out / fname), metadata={"format": "pt"}
        )
        weight_map.update(dict.fromkeys(shard, fname))
        shard.clear()  # frees the device copies as we go
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    tok.save(out)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    decoder_bytes = sum(
        int(np.prod(s)) * 2
        for k, s in shapes.items()
        if k.startswith("model.transformer.") and ".wte." not in k  # the embedding is gathered
    )
    return {
        "params": sum(int(np.prod(s)) for s in shapes.values()),
        "weight_bytes": sum(sizes),
        "decoder_bytes_per_token": decoder_bytes,
        "generate_s": round(gen_s, 1),
        "write_s": round(time.perf_counter() - t - gen_s, 1),
    }


def copy_bandwidth_gbs(device: torch.device) -> float:
    n = (1 << 30) if device.type == "cuda" else (1 << 28)
    x = torch.empty(n, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    reps = 10 if device.type == "cuda" else 3
    t = time.perf_counter()
    for _ in range(reps):
        y.copy_(x)
    sync(device)
    dt = (time.perf_counter() - t) / reps
    del x, y
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * n / dt / 1e9  # bytes read + written


# ---------------------------------------------------------------------------------------------
# 2-3. Engine and measurements
# ---------------------------------------------------------------------------------------------


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR)


def start_engine(model_dir: Path, cuda: bool, eager: bool):
    from vllm import LLM

    kwargs: dict = dict(
        model=str(model_dir),
        dtype="bfloat16" if cuda else "float32",
        max_model_len=4096,
        max_num_seqs=8,
        enable_prefix_caching=False,
        limit_mm_per_prompt={"image": 1},
        enforce_eager=eager or not cuda,
        seed=0,
    )
    if cuda:
        kwargs["gpu_memory_utilization"] = 0.85
        if not eager:
            kwargs["compilation_config"] = {"cudagraph_capture_sizes": [1, 2, 4, 8]}
    return LLM(**kwargs)


def timed(llm, prompt, params) -> tuple[float, object]:
    t = time.perf_counter()
    out = llm.generate(prompt, params, use_tqdm=False)[0]
    return time.perf_counter() - t, out


def measure(llm, tok, decode_tokens: int, reps: int) -> dict[str, object]:
    from vllm import SamplingParams

    from molmo_model.preprocessing import MolmoPreprocessor, image_grid
    from molmo_vllm.prompt import build_prompt

    res: dict[str, object] = {}
    text = build_prompt(tok, "Write a long story about a lighthouse keeper.")
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
    many = SamplingParams(
        temperature=0.0, max_tokens=decode_tokens + 1, ignore_eos=True, detokenize=False
    )
    timed(llm, text, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))  # warm-up
    t1 = min(timed(llm, text, one)[0] for _ in range(reps))
    tn = min(timed(llm, text, many)[0] for _ in range(max(2, reps - 1)))
    res["decode_tokens"] = decode_tokens
    res["decode_tok_s"] = round(decode_tokens / (tn - t1), 1)
    log(f"decode batch 1: {res['decode_tok_s']} tok/s")

    w, h = 1000, 750
    assert image_grid(w, h) == (3, 4)
    timed(llm, build_prompt(tok, QUESTION, [noise_image(w, h, 0)]), one)  # warm-up
    image_s, text_s, n_prompt = [], [], 0
    for r in range(reps):
        dt, out = timed(llm, build_prompt(tok, QUESTION, [noise_image(w, h, 100 + r)]), one)
        image_s.append(dt)
        n_prompt = len(out.prompt_token_ids)
        same_len = {
            "prompt_token_ids": [tok.bos_id]
            + [(17 * i + r) % 400 + 10 for i in range(n_prompt - 1)]
        }
        text_s.append(timed(llm, same_len, one)[0])
    pre = MolmoPreprocessor(get_preset("molmo-7b-d").preprocess, tok)
    img = noise_image(w, h, 999)
    t = time.perf_counter()
    pre.preprocess(img)
    res.update(
        ttft_image=f"{w}x{h} (3x4 grid + global view = 13 crops)",
        ttft_prompt_tokens=n_prompt,
        ttft_image_ms_median=round(statistics.median(image_s) * 1e3, 1),
        ttft_image_ms_min=round(min(image_s) * 1e3, 1),
        ttft_text_same_length_ms_median=round(statistics.median(text_s) * 1e3, 1),
        preprocess_ms=round((time.perf_counter() - t) * 1e3, 1),
    )
    log(
        f"TTFT 12-crop image: {res['ttft_image_ms_median']} ms (text baseline {res['ttft_text_same_length_ms_median']} ms)"
    )
    return res


def baseline_rows(res: dict[str, object]) -> list[dict[str, object]]:
    """Each measure beside its named baseline, as far as the run got."""
    pairs = [
        ("decode tok/s, batch 1", "decode_tok_s", "bandwidth_bound_tok_s", "copy bandwidth / decoder bytes"),
        ("TTFT ms, 12-crop image", "ttft_image_ms_median", "ttft_text_same_length_ms_median",
         "text prompt of the same length"),
    ]  # fmt: skip
    return [{"measure": m, "ours": res[ours], "baseline": res[base], "baseline_name": b}
            for m, ours, base, b in pairs if ours in res and base in res]  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="molmo-7b-d", help="molmo-7b-d, or tiny for a dry run")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--eager", action="store_true", help="no torch.compile / CUDA graphs")
    ap.add_argument("--workdir", help="where the checkpoint goes (default: a temporary folder)")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(RESULTS))
    a = ap.parse_args()
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # this process touched CUDA
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4" if a.preset != "tiny" else "1")

    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_7b: CUDA is not available (use --preset tiny --device cpu for a dry run)")
        return 1
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(0) if cuda else (platform.processor() or platform.machine())
    out_dir = Path(a.out)
    slug = "cpu_dry_run" if not cuda else name.replace(" ", "_").replace("/", "_")
    machine = describe_machine()
    res: dict[str, object] = {
        "device": name,
        "preset": a.preset,
        "host": platform.node(),
        "torch": torch.__version__,
        "dtype_on_disk": "bfloat16",
    }

    def save() -> None:  # after every stage: a crash keeps what was measured
        write_results(f"gpu_7b_{slug}", baseline_rows(res), meta=res, out_dir=out_dir, machine=machine)

    cfg = get_preset(a.preset)
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="molmo-gpu7b-"))
    ckpt = work / a.preset
    log(f"writing random {a.preset} checkpoint to {ckpt}")
    res["checkpoint"] = write_checkpoint(cfg, ckpt, device)
    log(f"checkpoint: {res['checkpoint']}")
    bw = copy_bandwidth_gbs(device)
    res["copy_bandwidth_gbs"] = round(bw, 1)
    res["bandwidth_bound_tok_s"] = round(bw * 1e9 / res["checkpoint"]["decoder_bytes_per_token"], 1)
    save()

    import vllm

    from molmo_model.tokenizer import MolmoTokenizer

    res["vllm"] = vllm.__version__
    tok = MolmoTokenizer.from_dir(ckpt)
    t = time.perf_counter()
    eager = a.eager
    try:
        llm = start_engine(ckpt, cuda, eager)
    except Exception as e:  # one retry, recorded: eager mode and the PyTorch pooling
        if eager and os.environ.get("MOLMO_KERNELS_BACKEND") == "torch":
            raise
        res["first_start_error"] = "".join(traceback.format_exception_only(e)).strip()[-2000:]
        log(
            f"engine start failed ({res['first_start_error'][:200]}); retrying eager with torch pooling"
        )
        save()
        eager = True
        os.environ["MOLMO_KERNELS_BACKEND"] = "torch"
        llm = start_engine(ckpt, cuda, eager)
    res["engine_start_s"] = round(time.perf_counter() - t, 1)
    res["eager"] = eager or not cuda
    log(f"engine started in {res['engine_start_s']} s (eager={res['eager']})")
    save()

    res.update(measure(llm, tok, a.decode_tokens, a.reps))
    res["decode_vs_bandwidth_bound"] = round(res["decode_tok_s"] / res["bandwidth_bound_tok_s"], 3)
    res["total_s"] = round(time.perf_counter() - T0, 1)
    save()
    print(json.dumps(res, indent=2))
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
