"""Molmo-7B-D shapes on a GPU through our PyTorch reference model (no vLLM needed).

Builds the real `molmo-7b-d` model with random bf16 weights directly on the GPU, then measures:
- the vision backbone on one 12-crop image (13 crops with the global view): time, and the
  pooling step with the Triton kernel vs the PyTorch reference (same outputs checked);
- time to first token for that image + a short question (preprocess + vision + prefill + one step);
- decode tokens/s at batch 1 with the reference KV cache, against the bandwidth floor
  (weight bytes / measured device-to-device copy bandwidth) as the named baseline.

    python benchmarks/gpu_reference_7b.py [--out DIR] [--decode-tokens 128]

Writes gpu_reference_7b_<gpu>.json/.csv to --out (default benchmarks/results). Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from benchmarks.report import RESULTS, write_results  # noqa: E402
from molmo_model.config import get_preset  # noqa: E402
from molmo_model.model import KVCache, MolmoForCausalLM  # noqa: E402
from molmo_model.preprocessing import MolmoPreprocessor, image_grid  # noqa: E402


class _Ids:
    """Special token ids in Molmo's layout (the image tokens are the first extra rows)."""

    def __init__(self, embedding_size: int):
        self.n = embedding_size
        self.bos_id = self.eos_id = embedding_size - 1
        self.im_start_id, self.im_end_id, self.im_patch_id, self.im_col_id = (
            embedding_size + i for i in range(4)
        )

    def encode(self, text: str) -> list[int]:
        return [(ord(c) * 7) % (self.n - 1) for c in text]  # stand-in ids: only the count matters


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, reps: int = 3):
    fn()
    _sync()
    t = time.perf_counter()
    for _ in range(reps):
        out = fn()
    _sync()
    return out, (time.perf_counter() - t) / reps


def _bandwidth_gbs() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda" if torch.cuda.is_available() else "cpu")
    y = torch.empty_like(x)
    _, dt = _timed(lambda: y.copy_(x), reps=10)
    return 2 * x.numel() / dt / 1e9  # bytes read + written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--preset", default="molmo-7b-d", help="tiny: a CPU dry run of this script")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_reference_7b: CUDA is not available; nothing to measure on this machine.")
        return 0
    dev = torch.device(a.device)
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else f"cpu-{platform.machine()}"
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    res: dict = {"device": name, "torch": torch.__version__, "host": platform.node(), "dtype": str(dtype), "preset": a.preset}

    cfg = get_preset(a.preset)
    t0 = time.perf_counter()
    torch.set_default_dtype(dtype)
    with dev:
        model = MolmoForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in n or "ln" in n):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.eval()
    _sync()
    n_params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    res.update(build_s=round(time.perf_counter() - t0, 1), params=n_params, weight_gb=weight_bytes / 1e9)
    print(f"built {a.preset} on {name}: {n_params / 1e9:.2f} B params in {res['build_s']} s")

    # One image with a 3x4 grid: 12 high-res crops + the global view.
    w, h = 1000, 750
    assert image_grid(w, h) == (3, 4), image_grid(w, h)
    img = Image.new("RGB", (w, h), (120, 30, 200))
    pre = MolmoPreprocessor(cfg.preprocess, _Ids(cfg.llm.embedding_size))
    t = time.perf_counter()
    ids, inputs = pre.build_prompt("Point to the purple square.", [img])
    res["preprocess_ms"] = round((time.perf_counter() - t) * 1e3, 2)
    inp = inputs[0]
    images = inp.images.to(dev, dtype)
    masks = inp.image_masks.to(dev)
    input_ids = torch.tensor([ids], device=dev)
    res["prompt_tokens"], res["crops"] = len(ids), int(images.shape[0])

    vb = model.model.vision_backbone
    with torch.no_grad():
        from kernels import attention_pool

        feats, vt = _timed(lambda: vb(images, masks))
        res["vision_ms"] = round(vt * 1e3, 2)
        # Pooling core: Triton vs reference on this image's windows.
        n_win = images.shape[0] * 144
        heads, hd = cfg.vision.image_num_heads, cfg.vision.image_head_dim
        q = torch.randn(n_win, heads, hd, device=dev, dtype=dtype)
        k = torch.randn(n_win, 4, heads, hd, device=dev, dtype=dtype)
        v = torch.randn_like(k)
        ref, rt = _timed(lambda: attention_pool(q, k, v, backend="torch"), reps=20)
        backend = "triton" if dev.type == "cuda" else "torch"
        tri, tt = _timed(lambda: attention_pool(q, k, v, backend=backend), reps=20)
        res["pool_ref_us"], res["pool_triton_us"] = round(rt * 1e6, 1), round(tt * 1e6, 1)
        res["pool_max_abs_err"] = float((ref.float() - tri.float()).abs().max())

        def ttft():
            t = time.perf_counter()
            _, inps = pre.build_prompt("Point to the purple square.", [img])
            x = inps[0]
            cache = KVCache.empty(cfg.llm.num_hidden_layers)
            emb = model.embed(
                input_ids, x.images.to(dev, dtype), x.image_masks.to(dev), x.patch_order.to(dev)
            )
            logits = model(input_ids, cache=cache, inputs_embeds=emb).logits[:, -1]
            tok = int(logits.argmax())
            _sync()
            return time.perf_counter() - t, cache, tok

        ttft()
        times = [ttft()[0] for _ in range(3)]
        res["ttft_ms"] = round(min(times) * 1e3, 1)

        # Decode at batch 1 from the prefilled cache.
        _, cache, tok = ttft()
        step = torch.tensor([[tok]], device=dev)
        for _ in range(8):  # warm-up
            model(step, cache=cache)
        _sync()
        t = time.perf_counter()
        for _ in range(a.decode_tokens):
            logits = model(step, cache=cache).logits[:, -1]
            step = logits.argmax(-1, keepdim=True)
        _sync()
        dt = time.perf_counter() - t
    res["decode_tok_s"] = round(a.decode_tokens / dt, 1)
    bw = _bandwidth_gbs()
    res["copy_bandwidth_gbs"] = round(bw, 0)
    res["decode_floor_tok_s"] = round(bw * 1e9 / weight_bytes, 1)  # baseline: bandwidth bound
    res["decode_vs_floor"] = round(res["decode_tok_s"] / res["decode_floor_tok_s"], 3)
    print(json.dumps(res, indent=2))
    rows = [
        {"measure": "decode tok/s, batch 1", "ours": res["decode_tok_s"], "baseline": res["decode_floor_tok_s"],
         "baseline_name": "copy bandwidth / weight bytes"},
        {"measure": "attention pool us", "ours": res["pool_triton_us"], "baseline": res["pool_ref_us"],
         "baseline_name": "PyTorch reference"},
    ]  # fmt: skip
    write_results(f"gpu_reference_7b_{name.replace(' ', '_').replace('/', '_')}", rows, meta=res, out_dir=a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
