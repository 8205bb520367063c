"""Benchmark the Triton kernels of `kernels/` against their PyTorch references on a GPU.

    python benchmarks/kernel_ops.py --check     # check against the references, then time (< 90 s)
    python benchmarks/kernel_ops.py             # time only

Ops, shapes and providers (each timed forward and forward+backward, in bf16 and fp16):
- attention_pool, N = 12 crops x 144 windows x 8 images = 13824 windows, K = 4, H = 16, D = 64:
  `torch` (attention_pool_reference) vs `triton`.
- annotation_attention, B = 4, Hq = 28, Hkv = 4, S = 2048, D = 128, a 1500-token prefix then
  10 annotations, the batch's later rows ending in padding: `torch` (SDPA with the boolean
  annotation mask) vs `triton`, plus `sdpa_causal`, plain causal SDPA on the same tensors (a
  different, cheaper mask: the speed of PyTorch's fused attention without the annotation rule).

`--check` first compares each kernel with its reference on fresh random inputs (small odd shapes
and the benchmark shapes; outputs and every gradient) and prints PASS/FAIL per case: the error is
||kernel - gold|| / ||gold||, gold being the reference run in float32 on the same inputs; a case
passes if that is under the dtype's tolerance or within twice the error of the reference run in
the case's own dtype. The exit status is 1 if any case failed.

Results go to benchmarks/results/kernels_<gpu-name>.json and .csv (or --out-dir) with the machine
(GPU name, versions) and the check results. On a machine without CUDA the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# First on the path, ahead of this script's own folder: there `import kernels` would find this
# file instead of the package. Also makes the script run from a checkout without installing.
sys.path.insert(0, str(REPO))

from benchmarks.report import RESULTS, write_results  # noqa: E402
from kernels.annotation_attention import (  # noqa: E402
    annotation_attention,
    annotation_attention_reference,
    annotation_mask,
)
from kernels.attention_pool import attention_pool, attention_pool_reference  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}  # relative L2

POOL_SHAPE = dict(n=12 * 144 * 8, k=4, h=16, d=64)
ANNOTATION_SHAPE = dict(b=4, hq=28, hkv=4, s=2048, d=128, prefix=1500, annotations=10)


def packed_segments(b: int, s: int, prefix: int, annotations: int, lead: int = 0,
                    seed: int = 0) -> torch.Tensor:
    """[B, S] ids: `lead` padding tokens (row 0 only), the prefix, `annotations` annotations of
    random lengths, then 16 * row padding tokens at the end."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(b):
        head = lead if i == 0 else 0
        tail = 16 * i
        body = s - head - prefix - tail
        assert body >= annotations, "too short for that many annotations"
        cuts = torch.randperm(body - 1, generator=gen)[: annotations - 1] + 1
        bounds = [0] + sorted(cuts.tolist()) + [body]
        row = [-1] * head + [0] * prefix
        for ann, (lo, hi) in enumerate(pairwise(bounds), start=1):
            row += [ann] * (hi - lo)
        rows.append(row + [-1] * tail)
    return torch.tensor(rows, dtype=torch.int32)


# ----------------------------------------------------------------------------- checks

def _outputs_and_grads(fn: Callable, inputs: list[torch.Tensor], grad: torch.Tensor | None) -> list:
    """[out] + the inputs' grads (float32); just [out] when `grad` is None (a forward-only check)."""
    if grad is None:
        with torch.no_grad():
            return [fn(*inputs).float()]
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return [out.detach().float()] + [x.grad.float() for x in leaves]


def check_case(name: str, kernel: Callable, reference: Callable, shapes: list[tuple],
               dtype: torch.dtype, seed: int, device: str = "cuda",
               grads: bool = True) -> tuple[bool, str]:
    """One case: kernel vs float32 gold and the same-dtype reference; (passed, report line).
    grads=False checks the output only."""
    gen = torch.Generator(device=device).manual_seed(seed)
    inputs = [torch.randn(s, device=device, generator=gen).to(dtype) for s in shapes]
    grad = torch.randn(shapes[0], device=device, generator=gen) if grads else None  # q's shape
    gold = _outputs_and_grads(reference, [x.float() for x in inputs], grad)
    got = _outputs_and_grads(kernel, inputs, grad)
    same_dtype = _outputs_and_grads(reference, inputs, grad)
    worst, ok = "", True
    labels = ["out", "dq", "dk", "dv"][: len(got)]
    for label, g, want, base in zip(labels, got, gold, same_dtype, strict=True):
        err = ((g - want).norm() / want.norm().clamp_min(1e-12)).item()
        base_err = ((base - want).norm() / want.norm().clamp_min(1e-12)).item()
        good = bool(torch.isfinite(g).all()) and err <= max(TOLERANCE[dtype], 2 * base_err)
        ok &= good
        worst += f" {label} {err:.1e}({base_err:.1e})"
    line = f"{'PASS' if ok else 'FAIL'}  {name:<58} {str(dtype)[6:]:<9} err(torch):{worst}"
    return ok, line


def run_checks() -> list[dict]:
    results = []

    def record(ok_line: tuple[bool, str], case: str, dtype: torch.dtype) -> None:
        ok, line = ok_line
        print(line, flush=True)
        results.append(dict(case=case, dtype=str(dtype)[6:], passed=ok, report=line))

    pool_cases = [((37, 4, 16, 64), [torch.float32, torch.float16, torch.bfloat16]),
                  ((13, 1, 2, 16), [torch.bfloat16]),
                  ((9, 2, 16, 32), [torch.float32]),
                  (tuple(POOL_SHAPE.values()), [torch.bfloat16, torch.float16])]
    for seed, ((n, k, h, d), dtypes) in enumerate(pool_cases):
        for dtype in dtypes:
            name = f"attention_pool N={n} K={k} H={h} D={d}"
            kernel = lambda q, kk, v: attention_pool(q, kk, v, backend="triton")  # noqa: E731
            record(check_case(name, kernel, attention_pool_reference,
                              [(n, h, d), (n, k, h, d), (n, k, h, d)], dtype, seed), name, dtype)

    a = ANNOTATION_SHAPE
    ann_cases = [((2, 28, 4, 300, 128, 100, 6), [torch.float32, torch.float16, torch.bfloat16]),
                 ((1, 4, 2, 77, 64, 20, 5), [torch.float32, torch.bfloat16]),
                 ((a["b"], a["hq"], a["hkv"], a["s"], a["d"], a["prefix"], a["annotations"]),
                  [torch.bfloat16, torch.float16])]
    for seed, ((b, hq, hkv, s, d, prefix, n_ann), dtypes) in enumerate(ann_cases):
        seg = packed_segments(b, s, prefix, n_ann, lead=3, seed=seed).cuda()
        for dtype in dtypes:
            name = f"annotation_attention B={b} Hq={hq} Hkv={hkv} S={s} D={d}"
            kernel = lambda q, k, v, seg=seg: annotation_attention(  # noqa: E731
                q, k, v, seg, backend="triton")
            reference = lambda q, k, v, seg=seg: annotation_attention_reference(  # noqa: E731
                q, k, v, seg)
            ok, line = check_case(name, kernel, reference,
                                  [(b, hq, s, d), (b, hkv, s, d), (b, hkv, s, d)], dtype, seed)
            # Row 0 opens with 3 padding tokens that see no key: exact zeros, not NaN.
            q = torch.randn(b, hq, s, d, device="cuda", dtype=dtype)
            kv = torch.randn(b, hkv, s, d, device="cuda", dtype=dtype)
            empty = annotation_attention(q, kv, kv, seg, backend="triton")[0, :, :3]
            if not bool((empty == 0).all()):
                ok, line = False, line.replace("PASS", "FAIL", 1) + "  (rows that see nothing != 0)"
            record((ok, line), name, dtype)
    return results


# ------------------------------------------------------------------------------ timing

def _time_ms(fn: Callable, backward: bool, inputs: list[torch.Tensor]) -> float:
    import triton.testing

    if backward:
        grad = torch.randn_like(fn(*inputs))

        def step():
            fn(*inputs).backward(grad)
    else:
        def step():
            with torch.no_grad():
                fn(*inputs)
    return triton.testing.do_bench(step, warmup=10, rep=40, grad_to_none=inputs,
                                   return_mode="median")


def run_benchmarks(dtypes: list[torch.dtype]) -> list[dict]:
    rows = []
    p = POOL_SHAPE
    a = ANNOTATION_SHAPE
    seg = packed_segments(a["b"], a["s"], a["prefix"], a["annotations"]).cuda()
    visible_pairs = int(annotation_mask(seg).sum())  # per head
    causal_pairs = sum(a["s"] * (a["s"] + 1) // 2 for _ in range(a["b"]))

    ops = {
        "attention_pool": (
            [(p["n"], p["h"], p["d"]), (p["n"], p["k"], p["h"], p["d"]),
             (p["n"], p["k"], p["h"], p["d"])],
            {
                "torch": attention_pool_reference,
                "triton": lambda q, k, v: attention_pool(q, k, v, backend="triton"),
            },
            f"N={p['n']} K={p['k']} H={p['h']} D={p['d']}",
        ),
        "annotation_attention": (
            [(a["b"], a["hq"], a["s"], a["d"]), (a["b"], a["hkv"], a["s"], a["d"]),
             (a["b"], a["hkv"], a["s"], a["d"])],
            {
                "torch": lambda q, k, v: annotation_attention_reference(q, k, v, seg),
                "triton": lambda q, k, v: annotation_attention(q, k, v, seg, backend="triton"),
                "sdpa_causal": lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=True, enable_gqa=True),
            },
            f"B={a['b']} Hq={a['hq']} Hkv={a['hkv']} S={a['s']} D={a['d']} "
            f"prefix={a['prefix']} annotations={a['annotations']}",
        ),
    }
    for op, (shapes, providers, shape_text) in ops.items():
        for dtype in dtypes:
            inputs = [torch.randn(s, device="cuda", dtype=dtype, requires_grad=True) for s in shapes]
            for mode in ("fwd", "fwd+bwd"):
                base = None
                for provider, fn in providers.items():
                    ms = _time_ms(fn, mode == "fwd+bwd", inputs)
                    base = ms if provider == "torch" else base
                    row = dict(op=op, shape=shape_text, dtype=str(dtype)[6:], mode=mode,
                               provider=provider, ms=round(ms, 4),
                               speedup_vs_torch=round(base / ms, 2))
                    if op == "attention_pool":  # bytes of q, k, v, out (and the grads)
                        elems = sum(x.numel() for x in inputs) + inputs[0].numel()
                        row["GB_per_s"] = round(elems * inputs[0].element_size()
                                                * (1 if mode == "fwd" else 3) / ms / 1e6, 1)
                    else:  # 2 matmuls forward, 5 backward, over the pairs each mask keeps
                        pairs = causal_pairs if provider == "sdpa_causal" else visible_pairs
                        flops = 4 * a["d"] * a["hq"] * pairs * (1 if mode == "fwd" else 3.5)
                        row["TFLOP_per_s"] = round(flops / ms / 1e9, 1)
                    rows.append(row)
                    print(_format_row(row), flush=True)
    return rows


def _format_row(row: dict) -> str:
    rate = f"{row['GB_per_s']:>8.1f} GB/s" if "GB_per_s" in row else \
        f"{row['TFLOP_per_s']:>8.1f} TFLOP/s"
    return (f"{row['op']:<22} {row['dtype']:<9} {row['mode']:<8} {row['provider']:<12} "
            f"{row['ms']:>9.3f} ms {row['speedup_vs_torch']:>6.2f}x {rate}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="compare with the references first; exit 1 on any FAIL")
    parser.add_argument("--dtypes", default="bf16,fp16", help="comma list of bf16, fp16, fp32")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("benchmarks/kernel_ops.py: no CUDA device on this machine; the Triton kernels run on "
              "GPUs only (CPU code uses the PyTorch references). Nothing to benchmark.")
        return 0
    dtypes = [DTYPES[name] for name in args.dtypes.split(",")]
    import triton

    start = time.perf_counter()
    device = torch.cuda.get_device_name()
    print(f"device: {device}  torch {torch.__version__}  triton {triton.__version__}", flush=True)
    checks = run_checks() if args.check else []
    passed = all(c["passed"] for c in checks)
    if args.check:
        print(f"check: {'PASS' if passed else 'FAIL'} "
              f"({sum(c['passed'] for c in checks)}/{len(checks)} cases)", flush=True)
    rows = run_benchmarks(dtypes)

    meta = dict(device=device, capability=".".join(map(str, torch.cuda.get_device_capability())),
                triton=triton.__version__, date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), baseline="torch",
                seconds=round(time.perf_counter() - start, 1), checks=checks)
    write_results(f"kernels_{re.sub(r'[^A-Za-z0-9]+', '-', device).strip('-')}", rows, meta=meta,
                  out_dir=args.out_dir)
    print(f"{meta['seconds']} s" + (f"; check {'PASS' if passed else 'FAIL'}" if args.check else ""))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
