"""The Triton kernels against the strongest alternatives a user has, checked then timed in one run.

    python benchmarks/kernels_frontier.py --check           # a CUDA machine, after scripts/setup.sh
    python benchmarks/kernels_frontier.py --check --quick   # one size per op, fewer baselines
    python benchmarks/kernels_frontier.py --device cpu      # dry run: tiny shapes, interpreter

annotation_attention (Molmo-7B's attention: Hq = 28, Hkv = 4, D = 128), bf16, forward and
forward+backward, at S = 2048, 4096, 8192 with B = 8192 // S rows, each packed as training packs
(training/packing.py): a shared image prefix (segment 0, min(2304, 3S/4) tokens), 4-16
annotations of random lengths filling the rest, then 0-5% right padding (-1) (the inputs and
the flash_varlen baseline: benchmarks/kernel_inputs.py). Providers:
  triton        annotation_attention(backend="triton")
  flex          FlexAttention, torch.compile'd, the same rule as a BlockMask built once from the
                same segment ids (kernels/annotation_flex.py; mask built outside the timing)
  sdpa_mask     annotation_attention_reference: SDPA with the dense boolean mask (the baseline)
  flash_varlen  flash_attn_varlen_func: each annotation a sequence whose keys are the prefix then
                itself (bottom-right causal), the prefix a sequence of its own; the gather of
                those keys is timed with it. Padding queries are not computed. Skipped, with the
                reason in the row, where flash_attn is not installed.
TFLOP/s count 4*D*Hq FLOPs per (query, key) pair of every 128x128 block the mask does not
empty (x3.5 forward+backward), the same numerator for every provider; % of peak divides by the
device's dense tensor-core peak for the dtype (PEAKS, by device name).

attention_pool (Molmo-7B's 2x2 pooling: K = 4, H = 16, D = 64) at 1, 4 and 16 images x 13 crops
x 144 windows, bf16: triton, torch (the eager reference) and compiled
(torch.compile(attention_pool_reference, mode="max-autotune")). GB/s over q, k, v, out (x3 with
the gradients) and % of the device's peak memory bandwidth.

fp32 dispatch: both ops at one size in fp32 with backend "torch", "triton" and "auto" (the
dispatch of kernels/dispatch.py): "auto" must not be slower than the faster of the two.

`--check` first compares every path with the float32 reference on fresh inputs, fp32, fp16
and bf16 (outputs and every gradient; relative L2 error under the dtype's tolerance or within
twice the reference's own error in that dtype, as benchmarks/kernel_ops.py) and the exit status
is 1 if any case failed. Results: benchmarks/results/kernels_frontier_<device>.json, .csv and
.png (or --out-dir), written by benchmarks/report.py with the machine.

`--device cpu` runs every code path of this script on tiny shapes: the Triton kernels in Triton's
interpreter, FlexAttention eagerly and forward only, no compiled baselines, no bf16 (the
interpreter has no bf16 dot); skipped rows say why. Its timings mean nothing; tests run it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `import kernels` must find the package, not a script here

from benchmarks.kernel_inputs import (  # noqa: E402
    MASK_BLOCK,
    flash_varlen_fn,
    mask_stats,
    packed_annotations,
)
from benchmarks.report import RESULTS, write_results  # noqa: E402

# Dense (no sparsity) peaks from the vendors' data sheets: tensor-core TFLOP/s by dtype ("fp32"
# is the CUDA-core rate: the fp32 paths use exact dots) and memory bandwidth in GB/s. Matched
# by substring of torch.cuda.get_device_name(), first match wins.
PEAKS = {
    "H200": dict(bf16=989, fp16=989, fp32=67, GB_per_s=4800),
    "H100 PCIe": dict(bf16=756, fp16=756, fp32=51, GB_per_s=2000),
    "H100": dict(bf16=989, fp16=989, fp32=67, GB_per_s=3350),
    "A100-SXM4-80GB": dict(bf16=312, fp16=312, fp32=19.5, GB_per_s=2039),
    "A100": dict(bf16=312, fp16=312, fp32=19.5, GB_per_s=1555),
    "L40S": dict(bf16=362, fp16=362, fp32=91.6, GB_per_s=864),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SHORT = {dtype: name for name, dtype in DTYPES.items()}


@dataclass
class Sizes:
    """Shapes of one run: Molmo-7B's on a GPU, tiny ones for the CPU dry run."""

    seq_lens: tuple[int, ...] = (2048, 4096, 8192)
    tokens: int = 8192  # B = tokens // S
    hq: int = 28
    hkv: int = 4
    d: int = 128
    images: tuple[int, ...] = (1, 4, 16)
    crops: int = 13
    windows: int = 144  # pooled 2x2 windows per crop
    pool_heads: int = 16
    pool_d: int = 64
    check_small: tuple[int, int, int, int, int] = (2, 28, 4, 300, 128)  # B, Hq, Hkv, S, D

    @classmethod
    def dry_run(cls) -> Sizes:
        return cls(seq_lens=(48, 80), tokens=96, hq=4, hkv=2, d=32, images=(1, 2), crops=2,
                   windows=9, pool_heads=2, pool_d=16, check_small=(2, 4, 2, 37, 16))

    def prefix(self, s: int) -> int:
        return min(2304, 3 * s // 4)


# ------------------------------------------------------------------------------- timing

def bench_ms(fn: Callable, inputs: list[torch.Tensor], backward: bool) -> float:
    """Median ms of fn(*inputs) (and its backward); on the CPU a few plain runs."""
    if backward:
        grad = torch.randn_like(fn(*inputs))

        def step():
            fn(*inputs).backward(grad)
    else:
        detached = [x.detach() for x in inputs]  # FlexAttention on the CPU refuses grad inputs

        def step():
            with torch.no_grad():
                fn(*detached)
    step()  # compiles, autotunes, allocates
    if inputs[0].is_cuda:
        import triton.testing

        return triton.testing.do_bench(step, warmup=25, rep=100, grad_to_none=inputs,
                                       return_mode="median")
    times = []
    for _ in range(2):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def _inputs(shapes: list[tuple], dtype: torch.dtype, device: str, grad: bool) -> list[torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(s, device=device, dtype=dtype, generator=gen).requires_grad_(grad)
            for s in shapes]


def time_providers(providers: dict, inputs: list[torch.Tensor], modes: list[str],
                   base: dict) -> list[dict]:
    """Rows {provider, mode, ms | skipped} for providers {name: fn or (None, reason) or
    (fn, modes it supports)}; `base` is copied into every row."""
    rows = []
    for mode in modes:
        for name, entry in providers.items():
            fn, note = entry if isinstance(entry, tuple) else (entry, "")
            row = dict(base, mode=mode, provider=name)
            if fn is None or (isinstance(note, tuple) and mode not in note):
                row |= dict(ms=None, skipped=note if fn is None else f"no {mode} on this device")
                rows.append(row)
                print(_format(row), flush=True)
                continue
            start = time.perf_counter()
            row["ms"] = round(bench_ms(fn, inputs, mode == "fwd+bwd"), 4)
            row["seconds_incl_compile"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            print(_format(row), flush=True)
    return rows


def _format(row: dict) -> str:
    rate = (f"{row['TFLOP_per_s']:>7.1f} TFLOP/s" if "TFLOP_per_s" in row else
            f"{row['GB_per_s']:>7.1f} GB/s" if "GB_per_s" in row else "")
    ms = f"{row['ms']:>9.3f} ms" if row.get("ms") is not None else f"skipped: {row.get('skipped')}"
    return f"{row['op']:<21} {row['size']:<18} {row['dtype']:<5} {row['mode']:<8} " \
           f"{row['provider']:<13} {ms} {rate}"


def annotation_rows(sizes: Sizes, device: str, gpu: bool, quick: bool, peaks: dict | None) -> list:
    from kernels.annotation_attention import annotation_attention, annotation_attention_reference
    from kernels.annotation_flex import annotation_attention_flex, annotation_block_mask

    rows = []
    for s in sizes.seq_lens[:1] if quick else sizes.seq_lens:
        b = max(1, sizes.tokens // s)
        seg = packed_annotations(b, s, sizes.prefix(s), seed=s).to(device)
        stats = mask_stats(seg)
        start = time.perf_counter()
        block_mask = annotation_block_mask(seg, MASK_BLOCK)
        mask_ms = round((time.perf_counter() - start) * 1e3, 2)
        flash, why = flash_varlen_fn(seg) if gpu else (None, "CPU dry run")
        providers = {  # seg=seg, mask=block_mask: bound now, not at the loop's end
            "triton": lambda q, k, v, seg=seg: annotation_attention(q, k, v, seg, backend="triton"),
            "flex": (lambda q, k, v, seg=seg, mask=block_mask: annotation_attention_flex(
                q, k, v, seg, block_mask=mask), ("fwd", "fwd+bwd") if gpu else ("fwd",)),
            "sdpa_mask": lambda q, k, v, seg=seg: annotation_attention_reference(q, k, v, seg),
            "flash_varlen": (flash, why),
        }
        dtype = torch.bfloat16 if gpu else torch.float32
        shapes = [(b, sizes.hq, s, sizes.d), (b, sizes.hkv, s, sizes.d), (b, sizes.hkv, s, sizes.d)]
        base = dict(op="annotation_attention", size=f"B={b} S={s}", S=s, B=b,
                    dtype=SHORT[dtype], block_mask_build_ms=mask_ms, **stats)
        got = time_providers(providers, _inputs(shapes, dtype, device, True), ["fwd", "fwd+bwd"],
                             base)
        rows += _annotation_rates(got, sizes, peaks)
    return rows


def _annotation_rates(rows: list[dict], sizes: Sizes, peaks: dict | None) -> list[dict]:
    """Adds TFLOP/s, % of peak and speed-ups over sdpa_mask and flex to timed rows."""
    by = {(r["mode"], r["provider"]): r["ms"] for r in rows}
    for r in rows:
        if r["ms"] is None:
            continue
        flops = 4 * sizes.d * sizes.hq * r["block_pairs"] * (1 if r["mode"] == "fwd" else 3.5)
        r["TFLOP_per_s"] = round(flops / r["ms"] / 1e9, 1)
        if peaks:
            r["pct_of_peak"] = round(100 * r["TFLOP_per_s"] / peaks[r["dtype"]], 1)
        for other in ("sdpa_mask", "flex"):
            if by.get((r["mode"], other)):
                r[f"speedup_vs_{other}"] = round(by[(r["mode"], other)] / r["ms"], 2)
    return rows


def pool_rows(sizes: Sizes, device: str, gpu: bool, quick: bool, peaks: dict | None) -> list:
    from kernels.attention_pool import attention_pool, attention_pool_reference

    compiled = (torch.compile(attention_pool_reference, mode="max-autotune", dynamic=False)
                if gpu else None)
    rows = []
    for images in sizes.images[1:2] if quick else sizes.images:
        n = images * sizes.crops * sizes.windows
        h, d = sizes.pool_heads, sizes.pool_d
        providers = {
            "triton": lambda q, k, v: attention_pool(q, k, v, backend="triton"),
            "torch": attention_pool_reference,
            "compiled": (compiled, "CPU dry run: no compiled baselines") if compiled is None
            else compiled,
        }
        dtype = torch.bfloat16 if gpu else torch.float32
        inputs = _inputs([(n, h, d), (n, 4, h, d), (n, 4, h, d)], dtype, device, True)
        base = dict(op="attention_pool", size=f"images={images} N={n}", images=images, N=n,
                    dtype=SHORT[dtype])
        got = time_providers(providers, inputs, ["fwd", "fwd+bwd"], base)
        by = {(r["mode"], r["provider"]): r["ms"] for r in got}
        for r in got:
            if r["ms"] is None:
                continue
            elems = sum(x.numel() for x in inputs) + inputs[0].numel()  # q, k, v, out
            r["GB_per_s"] = round(elems * inputs[0].element_size()
                                  * (1 if r["mode"] == "fwd" else 3) / r["ms"] / 1e6, 1)
            if peaks:
                r["pct_of_peak_bandwidth"] = round(100 * r["GB_per_s"] / peaks["GB_per_s"], 1)
            if by.get((r["mode"], "compiled")):
                r["time_vs_compiled"] = round(r["ms"] / by[(r["mode"], "compiled")], 3)
        rows += got
    return rows


def fp32_dispatch_rows(sizes: Sizes, device: str) -> list:
    """Both ops in fp32 with backend torch, triton and auto: what "auto" costs against the best."""
    from kernels.annotation_attention import annotation_attention
    from kernels.attention_pool import attention_pool

    s = sizes.seq_lens[0]
    b = max(1, sizes.tokens // s)
    seg = packed_annotations(b, s, sizes.prefix(s), seed=s).to(device)
    n = sizes.images[0] * sizes.crops * sizes.windows
    h, d = sizes.pool_heads, sizes.pool_d
    cases = [
        ("annotation_attention", f"B={b} S={s}", annotation_attention, (seg,),
         [(b, sizes.hq, s, sizes.d), (b, sizes.hkv, s, sizes.d), (b, sizes.hkv, s, sizes.d)]),
        ("attention_pool", f"N={n}", attention_pool, (), [(n, h, d), (n, 4, h, d), (n, 4, h, d)]),
    ]
    rows = []
    for op, size, fn, extra, shapes in cases:
        providers = {name: (lambda q, k, v, fn=fn, extra=extra, name=name:
                            fn(q, k, v, *extra, backend=name)) for name in ("torch", "triton", "auto")}
        got = time_providers(providers, _inputs(shapes, torch.float32, device, True),
                             ["fwd", "fwd+bwd"], dict(op=op, size=size, dtype="fp32", table="fp32_dispatch"))
        for mode in ("fwd", "fwd+bwd"):
            ms = {r["provider"]: r["ms"] for r in got if r["mode"] == mode}
            for r in got:
                if r["mode"] == mode and r["provider"] == "auto":
                    r["auto_vs_best"] = round(ms["auto"] / min(ms["torch"], ms["triton"]), 2)
        rows += got
    return rows


# ------------------------------------------------------------------------------- checks

def run_checks(sizes: Sizes, device: str, gpu: bool) -> list[dict]:
    """Every path against the float32 reference, in every dtype the device runs."""
    from benchmarks.kernel_ops import check_case
    from kernels.annotation_attention import annotation_attention, annotation_attention_reference
    from kernels.attention_pool import attention_pool, attention_pool_reference

    results = []

    def record(case: str, dtype: torch.dtype, outcome: tuple[bool, str] | str) -> None:
        row = dict(case=case, dtype=SHORT[dtype])
        if isinstance(outcome, str):
            row |= dict(passed=None, skipped=outcome)
            print(f"SKIP  {case:<58} {row['dtype']:<9} {outcome}", flush=True)
        else:
            row |= dict(passed=outcome[0], report=outcome[1])
            print(outcome[1], flush=True)
        results.append(row)

    b, hq, hkv, s, d = sizes.check_small
    big_s = sizes.seq_lens[0]
    ann_cases = [(b, hq, hkv, s, d, 3), (max(1, sizes.tokens // big_s), sizes.hq, sizes.hkv, big_s,
                                         sizes.d, 0)]
    n = sizes.images[0] * sizes.crops * sizes.windows
    pool_cases = [(37, 4, 16, 64) if gpu else (7, 4, 2, 16), (n, 4, sizes.pool_heads, sizes.pool_d)]
    for dtype in DTYPES.values():
        if not gpu and dtype == torch.bfloat16:
            record("every kernel", dtype, "Triton's interpreter has no bf16 dot")
            continue
        for seed, (nn, k, h, dd) in enumerate(pool_cases):
            name = f"attention_pool triton N={nn} K={k} H={h} D={dd}"
            record(name, dtype, check_case(
                name, lambda q, kk, v: attention_pool(q, kk, v, backend="triton"),
                attention_pool_reference, [(nn, h, dd), (nn, k, h, dd), (nn, k, h, dd)], dtype,
                seed, device))
        # The benchmark's own shape in bf16 only: each case is a FlexAttention compile on a GPU.
        for seed, (bb, qh, kh, ss, dd, lead) in enumerate(ann_cases[:1] if gpu and dtype !=
                                                          torch.bfloat16 else ann_cases):
            seg = packed_annotations(bb, ss, min(2304, 3 * ss // 4), seed, lead=lead).to(device)
            shapes = [(bb, qh, ss, dd), (bb, kh, ss, dd), (bb, kh, ss, dd)]
            ref = lambda q, k, v, seg=seg: annotation_attention_reference(q, k, v, seg)  # noqa: E731
            for backend in ("triton", "flex", "auto"):
                name = f"annotation_attention {backend} B={bb} Hq={qh} Hkv={kh} S={ss} D={dd}"
                fn = lambda q, k, v, seg=seg, be=backend: annotation_attention(  # noqa: E731
                    q, k, v, seg, backend=be)
                record(name, dtype, check_case(name, fn, ref, shapes, dtype, seed, device,
                                               grads=gpu or backend != "flex"))
            name = f"annotation_attention flash_varlen B={bb} S={ss} D={dd} (no padding)"
            if not gpu or dtype == torch.float32:
                record(name, dtype, "CPU dry run" if not gpu else "flash_attn has no fp32")
                continue
            seg_full = packed_annotations(bb, ss, min(2304, 3 * ss // 4), seed,
                                          padding=False).to(device)
            flash, why = flash_varlen_fn(seg_full)
            record(name, dtype, why if flash is None else check_case(
                name, flash, lambda q, k, v, seg=seg_full: annotation_attention_reference(
                    q, k, v, seg),
                shapes, dtype, seed, device))
    return results


# ------------------------------------------------------------------------ goals, plot

def goal_verdicts(rows: list[dict], judge: bool) -> list[dict]:
    """Issue 21's goals, each with the measured value and whether it is met (None: not timed,
    or not judged: the dry run's timings mean nothing)."""
    def ms(op, size, mode, provider, table=None):
        return next((r["ms"] for r in rows if (r["op"], r["size"], r["mode"], r["provider"])
                     == (op, size, mode, provider) and r.get("table") == table), None)

    goals = []
    for size in dict.fromkeys(r["size"] for r in rows if r["op"] == "annotation_attention"
                              and "table" not in r):
        ann = ("annotation_attention", size, "fwd+bwd")
        goals.append(("triton fwd+bwd vs flex >= 1.0x", size, ms(*ann, "flex"), ms(*ann, "triton"),
                      1.0))
        if size.endswith("S=8192"):
            goals.append(("triton fwd+bwd vs sdpa_mask >= 3x", size, ms(*ann, "sdpa_mask"),
                          ms(*ann, "triton"), 3.0))
    for size in dict.fromkeys(r["size"] for r in rows if r["op"] == "attention_pool"
                              and "table" not in r):
        for mode in ("fwd", "fwd+bwd"):
            pool = ("attention_pool", size, mode)  # <= 0.7x the time is >= 1/0.7x the speed
            goals.append((f"triton {mode} time <= 0.7x compiled", size, ms(*pool, "compiled"),
                          ms(*pool, "triton"), 1 / 0.7))
    for r in rows:
        if r.get("table") == "fp32_dispatch" and r["provider"] == "auto":
            best = min(ms(r["op"], r["size"], r["mode"], p, "fp32_dispatch")
                       for p in ("torch", "triton"))
            goals.append((f"{r['op']} fp32 auto {r['mode']} not slower than the best (5% noise)",
                          r["size"], best, r["ms"], 1 / 1.05))
    out = []
    for goal, size, base_ms, ours_ms, need in goals:
        ratio = round(base_ms / ours_ms, 2) if base_ms and ours_ms and judge else None
        out.append(dict(goal=goal, size=size, speedup=ratio,
                        met=None if ratio is None else ratio >= need))
        print(f"goal {'-' if ratio is None else 'MET' if ratio >= need else 'MISSED':<6} "
              f"{goal} [{size}]: {ratio}x", flush=True)
    return out



def make_figure(rows: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, op, key, label in [(axes[0], "annotation_attention", "S", "S (tokens)"),
                               (axes[1], "attention_pool", "images", "images x 13 crops")]:
        timed = [r for r in rows if r["op"] == op and r.get("ms") and "table" not in r]
        for mode, style in (("fwd", "--"), ("fwd+bwd", "-")):
            for color, provider in enumerate(dict.fromkeys(r["provider"] for r in timed)):
                pts = sorted((r[key], r["ms"]) for r in timed
                             if r["provider"] == provider and r["mode"] == mode)
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, marker="o", color=f"C{color}",
                            label=f"{provider} {mode}")
        ax.set(xscale="log", yscale="log", xlabel=label, ylabel="ms (lower is better)", title=op)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="check every path against the fp32 reference first; exit 1 on FAIL")
    parser.add_argument("--quick", action="store_true", help="one size per op")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: the dry run (tiny shapes, interpreter, no compiled baselines)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        print("benchmarks/kernels_frontier.py: no CUDA device here; `--device cpu` is the dry run.")
        return 0
    if not gpu:  # before the first import of kernels/: the interpreter is chosen then
        os.environ["TRITON_INTERPRET"] = "1"
    import triton
    from torch._dynamo import config as dynamo_config

    dynamo_config.automatic_dynamic_shapes = False  # one static compile per shape
    dynamo_config.cache_size_limit = 64
    sizes = Sizes() if gpu else Sizes.dry_run()
    name = torch.cuda.get_device_name() if gpu else "cpu-dry-run"
    peaks = next((p for key, p in PEAKS.items() if key in name), None)
    print(f"device: {name}  torch {torch.__version__}  triton {triton.__version__}", flush=True)

    start = time.perf_counter()
    checks = run_checks(sizes, args.device, gpu) if args.check else []
    failed = [c["case"] for c in checks if c["passed"] is False]
    if args.check:
        print(f"check: {'FAIL' if failed else 'PASS'} ({sum(bool(c['passed']) for c in checks)} "
              f"passed, {len(failed)} failed, {sum(c['passed'] is None for c in checks)} skipped)",
              flush=True)
    rows = annotation_rows(sizes, args.device, gpu, args.quick, peaks)
    rows += pool_rows(sizes, args.device, gpu, args.quick, peaks)
    rows += fp32_dispatch_rows(sizes, args.device)

    goals = goal_verdicts(rows, judge=gpu)
    meta = dict(device=name, peaks=peaks, triton=triton.__version__, quick=args.quick, goals=goals,
                dry_run=not gpu, date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                baselines=dict(annotation_attention="sdpa_mask, flex", attention_pool="compiled"),
                seconds=round(time.perf_counter() - start, 1), checks=checks)
    write_results(f"kernels_frontier_{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-')}", rows,
                  meta=meta, out_dir=args.out_dir, figure=make_figure(rows))
    print(f"{meta['seconds']} s" + (f"; check {'FAIL' if failed else 'PASS'}" if args.check else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
