"""Is a segment-aware attention worth it for the demo's packed training batches on a CPU?

The packing rule (`kernels.annotation_mask`) hides most of a packed sequence's S x S scores
from each query, but the CPU path (`annotation_attention_reference`, SDPA's flash kernel with
an explicit mask) computes all of them. The candidate here (the baseline is that reference)
computes the image prefix with `is_causal` and each annotation against the prefix and itself
only, annotations bucketed by length, then scatters the results back. Both run forward and
backward on random q, k, v (3 heads of 64, the demo's) over the segment layouts of the demo
preset's first batches; the script checks that they agree on every non-padding token.

    python experiments/attention_segments.py --steps 10

Writes experiments/results/attention_segments_cpu.json/.csv.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.report import EXPERIMENT_RESULTS, write_results  # noqa: E402
from kernels.annotation_attention import annotation_attention_reference  # noqa: E402


def demo_layouts(steps: int) -> list[torch.Tensor]:
    """segment_ids [B, S] of every forward of the demo preset's first `steps` steps."""
    from molmo_model.preprocessing import MolmoPreprocessor
    from molmo_model.tokenizer import build_tokenizer
    from training.config import run_preset
    from training.loader import StepBatches

    cfg = run_preset("demo")
    tok = build_tokenizer()
    config = cfg.model.build(tok.embedding_size)
    pre = MolmoPreprocessor(config.preprocess, tok)
    batches = StepBatches(cfg.data, pre, config.preprocess.tokens_per_side**2, seed=0, rank=0, world_size=1,
                          start_step=0, end_step=steps, extras=cfg.extras.build(cfg.data, pre))  # fmt: skip
    return [b.segment_ids for i in range(len(batches)) for b in batches[i]]


def segment_attention(q, k, v, seg, max_ratio: float = 1.3):
    """The prefix causal, each annotation against the prefix and itself (one prefix length)."""
    b, h, s, d = q.shape
    p = int((seg[0] == 0).sum())
    assert all(int((row == 0).sum()) == p and bool((row[:p] == 0).all()) for row in seg)
    prefix = F.scaled_dot_product_attention(q[:, :, :p], k[:, :, :p], v[:, :, :p], is_causal=True)
    pieces = []  # (length, row, positions) of every annotation
    for r in range(b):
        for a in seg[r, p:].unique().tolist():
            if a > 0:
                pos = (seg[r] == a).nonzero().flatten()
                pieces.append((len(pos), r, pos))
    pieces.sort(key=lambda x: x[0])
    buckets, current = [], []  # annotations of similar length, padded together
    for piece in pieces:
        if current and piece[0] > max_ratio * current[0][0]:
            buckets.append(current)
            current = []
        current.append(piece)
    if current:
        buckets.append(current)
    flat = [t.transpose(1, 2).reshape(b * s, h, d) for t in (q, k, v)]
    rows, values = [], []
    for bucket in buckets:
        n, longest = len(bucket), max(x[0] for x in bucket)
        idx = torch.zeros(n, longest, dtype=torch.long)
        valid = torch.zeros(n, longest, dtype=torch.bool)
        for i, (length, r, pos) in enumerate(bucket):
            idx[i, :length] = r * s + pos
            valid[i, :length] = True
        owner = torch.tensor([x[1] for x in bucket])
        qa = flat[0][idx].transpose(1, 2)  # [n, H, L, D]
        ka = torch.cat([k[owner, :, :p], flat[1][idx].transpose(1, 2)], 2)
        va = torch.cat([v[owner, :, :p], flat[2][idx].transpose(1, 2)], 2)
        own = torch.ones(longest, longest, dtype=torch.bool).tril()[None] & valid[:, None, :]
        mask = torch.cat([torch.ones(n, longest, p, dtype=torch.bool), own], 2)[:, None]
        out = F.scaled_dot_product_attention(qa, ka, va, attn_mask=mask).transpose(1, 2)  # [n, L, H, D]
        rows.append(idx[valid])
        values.append(out[valid])
    out = torch.zeros(b * s, h, d).index_put((torch.cat(rows),), torch.cat(values))
    return torch.cat([prefix, out.view(b, s, h, d).transpose(1, 2)[:, :, p:]], 2)


def _seconds(f, repeat: int = 3) -> float:
    f()
    t = time.perf_counter()
    for _ in range(repeat):
        f()
    return (time.perf_counter() - t) / repeat


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="demo training steps whose forwards to time")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    layouts = demo_layouts(args.steps)
    ref_s = seg_s = 0.0
    max_diff = 0.0
    for seg in layouts:
        b, s = seg.shape
        q, k, v = (torch.randn(b, 3, s, 64, requires_grad=True) for _ in range(3))
        keep = (seg >= 0)[:, None, :, None]
        with torch.no_grad():
            diff = (annotation_attention_reference(q, k, v, seg) - segment_attention(q, k, v, seg)) * keep
        max_diff = max(max_diff, float(diff.abs().max()))
        g = torch.randn(b, 3, s, 64) * keep
        ref_s += _seconds(lambda: (annotation_attention_reference(q, k, v, seg) * g).sum().backward())  # noqa: B023
        seg_s += _seconds(lambda: (segment_attention(q, k, v, seg) * g).sum().backward())  # noqa: B023
    n = len(layouts)
    rows = [{"path": "reference (masked flash SDPA)", "ms_forward_backward": 1e3 * ref_s / n, "speedup": 1.0},
            {"path": "segments", "ms_forward_backward": 1e3 * seg_s / n, "speedup": ref_s / seg_s}]  # fmt: skip
    print(f"{n} forwards: reference {rows[0]['ms_forward_backward']:.1f} ms, segments "
          f"{rows[1]['ms_forward_backward']:.1f} ms forward+backward a call ({rows[1]['speedup']:.2f}x); "
          f"max |diff| {max_diff:.1e}")  # fmt: skip
    meta = {"baseline": rows[0]["path"], "forwards": n, "max_abs_diff": max_diff}
    write_results("attention_segments_cpu", rows, meta=meta, out_dir=EXPERIMENT_RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
