"""Images/s through Molmo's image preprocessor, against a naive baseline, on this CPU.

For JPEG images of 336x336, 1280x720 and 4000x3000 it times:

* `decode only`: `load_image` alone (decode + EXIF + RGB), the floor any preprocessor pays;
* `ours`: `MolmoPreprocessor.preprocess`, split into decode (`load_image`), resize (float
  conversion, antialiased resize, pad, normalise: `resize_views`) and crop/patchify
  (`patchify` + token layout);
* `ours, 1 thread`: the same with torch limited to one intra-op thread for the call. On a
  CPU that other jobs keep busy, every multi-threaded torch op waits for its second thread
  to be scheduled; this row shows what a deployment pinning preprocessing to one thread gets;
* `naive PIL` (baseline): a straightforward implementation of the same output, with PIL's
  bilinear resize per view and Python loops over crops and patches.

Prints a table and writes benchmarks/results/preprocess.json and .csv with the machine.

    PYTHONPATH=. python benchmarks/preprocess.py [--seconds 12]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from benchmarks.report import describe_machine, write_results  # noqa: E402
from molmo_model.config import PreprocessConfig  # noqa: E402
from molmo_model.preprocessing import MolmoPreprocessor, load_image  # noqa: E402
from molmo_model.tokenizer import build_tokenizer  # noqa: E402

SIZES = [(336, 336), (1280, 720), (4000, 3000)]


def synthetic_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    """A photo-like JPEG: smooth gradients, a few shapes, mild noise (quality 90)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack(
        [
            128 + 100 * np.sin(x / (width / 6.0)),
            128 + 100 * np.cos(y / (height / 5.0)),
            255 * (x + y) / (width + height),
        ],
        axis=-1,
    )
    for _ in range(8):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.2) * width
        disc = (x - cx) ** 2 + (y - cy) ** 2 < r * r
        img[disc] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def ours_split(pre: MolmoPreprocessor, data: bytes) -> dict[str, float]:
    """The steps of `MolmoPreprocessor.preprocess`, timed one by one."""
    t0 = time.perf_counter()
    image = load_image(data)
    t1 = time.perf_counter()
    layout = pre.image_layout(*image.size)
    views = pre.resize_views(pre.to_tensor(image), layout.rows, layout.cols)
    t2 = time.perf_counter()
    images, masks = pre.patchify(views)
    t3 = time.perf_counter()
    assert images.shape[0] == layout.n_crops
    return {"decode": t1 - t0, "resize": t2 - t1, "patchify": t3 - t2}


def naive_split(config: PreprocessConfig, pre: MolmoPreprocessor, data: bytes) -> dict[str, float]:
    """Baseline: PIL resize of each view, then a Python loop over crops and patches."""
    t0 = time.perf_counter()
    image = Image.open(io.BytesIO(data)).convert("RGB")
    t1 = time.perf_counter()
    w, h = image.size
    rows, cols = pre.image_grid(w, h)
    mean, std = np.array(config.image_mean), np.array(config.image_std)
    views = []
    for n_rows, n_cols in ((1, 1), (rows, cols)):
        out_h, out_w = n_rows * 224 + 112, n_cols * 224 + 112
        scale = min(out_h / h, out_w / w)
        nh, nw = max(1, int(h * scale)), max(1, int(w * scale))
        canvas = Image.new("RGB", (out_w, out_h))
        canvas.paste(image.resize((nw, nh), Image.BILINEAR), ((out_w - nw) // 2, (out_h - nh) // 2))
        mask = np.zeros((out_h, out_w), dtype=bool)
        mask[
            (out_h - nh) // 2 : (out_h - nh) // 2 + nh, (out_w - nw) // 2 : (out_w - nw) // 2 + nw
        ] = 1
        views.append(((np.asarray(canvas) / 255.0 - mean) / std, mask, n_rows, n_cols))
    t2 = time.perf_counter()
    crops, crop_masks = [], []
    for pixels, mask, n_rows, n_cols in views:
        for i in range(n_rows):
            for j in range(n_cols):
                crop = pixels[i * 224 : i * 224 + 336, j * 224 : j * 224 + 336]
                cmask = mask[i * 224 : i * 224 + 336, j * 224 : j * 224 + 336]
                patches, fractions = [], []
                for py in range(24):
                    for px in range(24):
                        patches.append(
                            crop[py * 14 : py * 14 + 14, px * 14 : px * 14 + 14].reshape(-1)
                        )
                        fractions.append(
                            cmask[py * 14 : py * 14 + 14, px * 14 : px * 14 + 14].mean()
                        )
                crops.append(np.stack(patches))
                crop_masks.append(np.array(fractions))
    images = torch.from_numpy(np.stack(crops).astype(np.float32))
    pre.image_layout(w, h)
    t3 = time.perf_counter()
    assert images.shape == (1 + rows * cols, 576, 588)
    return {"decode": t1 - t0, "resize": t2 - t1, "patchify": t3 - t2}


def one_thread(fn):
    def run():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(threads)

    return run


def decode_only(data: bytes) -> dict[str, float]:
    t0 = time.perf_counter()
    load_image(data)
    return {"decode": time.perf_counter() - t0, "resize": 0.0, "patchify": 0.0}


def measure(methods: dict, seconds: float, min_iters: int = 3) -> dict[str, dict[str, float]]:
    """Median step times per method over at least `seconds` (after one warm-up each).

    Methods run round-robin, so a shared machine's changing load hits them alike; medians,
    because other jobs make a few runs much slower. total = sum of the step medians."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in methods}
    for fn in methods.values():
        fn()
    start = time.perf_counter()
    while min(len(r) for r in runs.values()) < min_iters or time.perf_counter() - start < seconds:
        for name, fn in methods.items():
            runs[name].append(fn())
    out = {}
    for name, rs in runs.items():
        steps = {k: float(np.median([r[k] for r in rs])) for k in rs[0]}
        total = sum(steps.values())
        out[name] = {**{f"{k}_ms": v * 1e3 for k, v in steps.items()}, "total_ms": total * 1e3,
                     "images_per_s": 1.0 / total, "iters": len(rs)}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=12.0, help="time per image size")
    args = parser.parse_args()

    config = PreprocessConfig()
    pre = MolmoPreprocessor(config, build_tokenizer())
    rows = []
    for width, height in SIZES:
        data = synthetic_jpeg(width, height)
        grid = pre.image_grid(width, height)
        methods = {
            "decode only": lambda d=data: decode_only(d),
            "ours": lambda d=data: ours_split(pre, d),
            "ours, 1 thread": one_thread(lambda d=data: ours_split(pre, d)),
            "naive PIL (baseline)": lambda d=data: naive_split(config, pre, d),
        }
        for name, r in measure(methods, args.seconds).items():
            rows.append({"size": f"{width}x{height}", "grid": f"{grid[0]}x{grid[1]}",
                         "crops": 1 + grid[0] * grid[1], "jpeg_kb": round(len(data) / 1024, 1),
                         "method": name, **r})  # fmt: skip
    for size in {r["size"] for r in rows}:
        base = next(r for r in rows if r["size"] == size and r["method"].startswith("naive"))
        for r in rows:
            if r["size"] == size:
                r["speedup_vs_naive"] = base["total_ms"] / r["total_ms"]

    header = f"{'size':>10} {'grid':>5} {'method':<21} {'decode':>8} {'resize':>8} {'patchify':>9} {'total':>8} {'img/s':>7} {'vs naive':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['size']:>10} {r['grid']:>5} {r['method']:<21} {r['decode_ms']:>6.1f}ms "
            f"{r['resize_ms']:>6.1f}ms {r['patchify_ms']:>7.1f}ms {r['total_ms']:>6.1f}ms "
            f"{r['images_per_s']:>7.2f} {r['speedup_vs_naive']:>7.2f}x"
        )
    info = describe_machine(with_vllm=False)
    print(f"\nmachine: {info}")

    write_results("preprocess", rows, meta={"baseline": "naive PIL (baseline)"}, machine=info)


if __name__ == "__main__":
    main()
