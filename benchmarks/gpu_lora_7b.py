"""One LoRA training step of Molmo-7B-D's shapes on one GPU: peak memory and time, measured
against training/memory.py's estimate (the named baseline: what `molmo train --lora` prints
and docs/lora.md's table is made of).

The model is built with the real `molmo-7b-d` shapes (8 B parameters) and random weights
drawn on the device: the frozen base in bf16, rank-R adapters in float32 on the decoder's
att_proj, attn_out, ff_proj, ff_out, bf16 autocast, AdamW on the adapters only (the
`lora` recipe of `molmo train --lora`). The batch is one 1000x750 image (12 crops + the
global view, through our preprocessor) followed by caption annotations packed up to the
sequence length, as `molmo train` packs a JSONL line. For each case (gradient checkpointing
off/on x sequence length x micro-batch), after warm-up steps: the median step time and
`torch.cuda.max_memory_allocated` over the timed steps, next to the estimate (activations,
weights, adapter state; the estimate's 2 GiB runtime overhead is reported apart, since the
allocator's peak does not include the CUDA context).

    python benchmarks/gpu_lora_7b.py                              # GPU (about 3-5 minutes on an H100)
    python benchmarks/gpu_lora_7b.py --preset tiny --device cpu   # dry run of the code path (CPU, seconds)

Prints JSON and writes gpu_lora_7b_<device>.json/.csv to $OUT when set, else to
benchmarks/results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from PIL import Image

# Run as a script, this folder comes first on sys.path and a module named like a package would
# shadow the `kernels` package: put the repository root there instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [q for q in sys.path if Path(q or ".").resolve() != _HERE]

from benchmarks.report import RESULTS, describe_machine, write_results  # noqa: E402
from molmo_model.config import MolmoConfig, get_preset  # noqa: E402
from molmo_model.lora import LoRAConfig, add_lora  # noqa: E402
from molmo_model.model import MolmoForCausalLM  # noqa: E402
from molmo_model.preprocessing import MolmoPreprocessor  # noqa: E402
from molmo_model.tokenizer import build_tokenizer  # noqa: E402
from training.data.records import Annotation, Example  # noqa: E402
from training.memory import OVERHEAD_BYTES, estimate_memory  # noqa: E402
from training.packing import collate, pack_example  # noqa: E402

GIB = 1024**3
T0 = time.perf_counter()
CAPTION = ("The picture shows a street corner in the late afternoon with a red bicycle leaning on a lamp "
           "post, two people waiting to cross, a blue door with a brass handle and a dog asleep in the "
           "shade of a cafe awning. ")  # fmt: skip


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def build_model(cfg: MolmoConfig, lora: LoRAConfig, device: torch.device) -> MolmoForCausalLM:
    """Random weights drawn on `device`: the frozen base in bf16 (float32 on a CPU dry run),
    adapters in float32."""
    base_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device("meta"):
        model = MolmoForCausalLM(cfg)
    model = model.to_empty(device=device).to(base_dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("pad_embed", ".bias")):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.requires_grad_(False)
    add_lora(model, lora, seed=0)
    for m in model.modules():  # the adapters were made on the CPU
        if hasattr(m, "lora_A"):
            m.to(device)
    model.to(device)
    return model.train()


def make_batch(cfg: MolmoConfig, seq_len: int, batch_size: int):
    """`batch_size` copies of one 1000x750 image with captions packed up to `seq_len` tokens."""
    tok = build_tokenizer(vocab_size=cfg.llm.embedding_size)
    pre = MolmoPreprocessor(cfg.preprocess, tok)
    image = Image.new("RGB", (1000, 750), (90, 120, 150))
    annotations = [Annotation(messages=[{"role": "user", "content": f"Describe part {i} of the image."},
                                        {"role": "assistant", "content": CAPTION * 2}]) for i in range(64)]  # fmt: skip
    packed = pack_example(Example(image, annotations), pre, max_len=seq_len)
    tokens_per_crop = cfg.preprocess.tokens_per_side**2
    return collate([packed] * batch_size, tok.pad_id, tokens_per_crop), packed.length


def run_case(model, cfg, lora, device, seq_len: int, batch_size: int, checkpointing: bool, steps: int,
             warmup: int) -> dict:  # fmt: skip
    batch, length = make_batch(cfg, seq_len, batch_size)
    batch = batch.to(device)
    model.grad_checkpointing = checkpointing
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-6)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    times = []
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        _sync(device)
        t = time.perf_counter()
        with autocast:
            loss = model(**batch.model_inputs()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
        if i == warmup - 1 and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()  # the timed steps' peak, AdamW's state included
    est = estimate_memory(cfg, lora, "bfloat16" if device.type == "cuda" else "float32", batch_size, length,
                          bf16_autocast=device.type == "cuda", grad_checkpointing=checkpointing)  # fmt: skip
    estimated = est.total_bytes - est.overhead_bytes
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del optimizer
    return {
        "grad_checkpointing": checkpointing, "batch_size": batch_size, "seq_len": length,
        "tokens": batch_size * length, "step_s_median": round(statistics.median(times), 4),
        "tokens_per_s": round(batch_size * length / statistics.median(times), 1),
        "peak_allocated_gib": None if peak is None else round(peak / GIB, 2),
        "estimate_gib": round(estimated / GIB, 2),
        "estimate_activations_gib": round(est.activation_bytes / GIB, 2),
        "peak_over_estimate": None if peak is None else round(peak / estimated, 3),
        "loss": round(float(loss.detach()), 3),
    }  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="molmo-7b-d")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seq-len", default="1536,2304", help="comma-separated")
    p.add_argument("--batch-size", default="1,2", help="comma-separated micro-batch sizes")
    p.add_argument("--steps", type=int, default=3, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default=os.environ.get("OUT") or str(RESULTS))
    a = p.parse_args(argv)
    device = torch.device(a.device)
    cfg = get_preset(a.preset)
    lora = LoRAConfig(rank=a.rank, alpha=2 * a.rank, dropout=0.05)
    log(f"building {a.preset} with rank-{a.rank} adapters on {device}")
    model = build_model(cfg, lora, device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(f"{trainable:,} trainable of {total:,} parameters")
    rows = []
    for checkpointing in (True, False):
        for seq_len in (int(s) for s in a.seq_len.split(",")):
            for batch_size in (int(b) for b in a.batch_size.split(",")):
                try:
                    row = run_case(model, cfg, lora, device, seq_len, batch_size, checkpointing, a.steps, a.warmup)
                except torch.OutOfMemoryError:
                    row = {"grad_checkpointing": checkpointing, "batch_size": batch_size, "seq_len": seq_len,
                           "error": "out of memory"}  # fmt: skip
                    model.zero_grad(set_to_none=True)
                except Exception:  # one case failing must not lose the others' numbers
                    row = {"grad_checkpointing": checkpointing, "batch_size": batch_size, "seq_len": seq_len,
                           "error": traceback.format_exc(limit=3)[-600:]}  # fmt: skip
                log(json.dumps(row))
                rows.append(row)
    meta = {"preset": a.preset, "rank": a.rank, "targets": list(lora.targets), "trainable_params": trainable,
            "total_params": total, "base_dtype": "bfloat16" if device.type == "cuda" else "float32",
            "runtime_overhead_gib_in_estimate": OVERHEAD_BYTES / GIB,
            "baseline": "training/memory.py's estimate without its runtime overhead"}  # fmt: skip
    name = f"gpu_lora_7b_{device.type}" if a.preset == "molmo-7b-d" else f"gpu_lora_7b_{device.type}_{a.preset}"
    path = write_results(name, rows, meta=meta, out_dir=a.out, machine=describe_machine())
    print(json.dumps({"meta": meta, "rows": rows}, indent=2))
    log(f"wrote {path}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
