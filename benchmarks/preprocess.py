"""Per-image CPU time and bytes sent to the engine: the fast and the exact image paths.

For JPEG images (quality 90, photo-like) of 640x480, 1920x1080 (1080p) and 4000x3000 (12 MP),
on one core (`torch.set_num_threads(1)`; CPU time of this process, `time.process_time`):

* `decode only` (the floor): Pillow's full decode + RGB (`molmo_model.images.load_image`);
* `exact` (the baseline): full decode, then `MolmoPreprocessor.preprocess` (float32 crops,
  pixel-identical to Ai2's preprocessing);
* `fast`: the server's decode (`server.images.decode_image`: JPEG draft mode and box
  reduction while the result still covers the canvas and keeps the crop grid), then
  `fast_preprocess` (uint8 crops; vLLM normalizes them on the device);
* `fast, full decode`: the fast path on the fully decoded image (what an offline
  `vllm.LLM` caller handing a PIL image gets).

Bytes to the engine: the `images` and `image_masks` tensors of one image. The release's HF
image processor (image_preprocessing_molmo.py) is not run: it is Ai2's remote code, which
this repository does not commit, and its resize needs TensorFlow, which is not installed.

Prints a table and writes benchmarks/results/preprocess.json and .csv with the machine.

    PYTHONPATH=. python benchmarks/preprocess.py [--seconds 6]
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
from molmo_model.fast_preprocessing import fast_preprocess  # noqa: E402
from molmo_model.preprocessing import MolmoPreprocessor, load_image  # noqa: E402
from molmo_model.tokenizer import build_tokenizer  # noqa: E402
from server.images import decode_image  # noqa: E402

SIZES = [(640, 480), (1920, 1080), (4000, 3000)]
MAX_PIXELS = 64_000_000


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


def engine_bytes(inputs) -> int:
    return inputs.images.nbytes + inputs.image_masks.nbytes


def methods(pre: MolmoPreprocessor, data: bytes) -> dict:
    """name -> fn(): (bytes to the engine, or 0 for decode only)."""
    config = pre.config
    return {
        "decode only": lambda: (load_image(data, MAX_PIXELS), 0)[1],
        "exact": lambda: engine_bytes(pre.preprocess(load_image(data, MAX_PIXELS))),
        "fast": lambda: engine_bytes(
            fast_preprocess(pre, decode_image(data, MAX_PIXELS, config).image)
        ),
        "fast, full decode": lambda: engine_bytes(
            fast_preprocess(pre, load_image(data, MAX_PIXELS))
        ),
    }


def measure(fns: dict, seconds: float, min_iters: int = 5) -> dict[str, dict[str, float]]:
    """Median CPU time per call (after one warm-up each), round-robin over the methods so
    a shared machine's changing load hits them alike."""
    runs: dict[str, list[float]] = {name: [] for name in fns}
    sent = {name: fn() for name, fn in fns.items()}
    start = time.perf_counter()
    while min(len(r) for r in runs.values()) < min_iters or time.perf_counter() - start < seconds:
        for name, fn in fns.items():
            t0 = time.process_time()
            fn()
            runs[name].append(time.process_time() - t0)
    return {
        name: {"cpu_ms": float(np.median(r)) * 1e3, "iters": len(r), "engine_bytes": sent[name]}
        for name, r in runs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="time per image size")
    args = parser.parse_args()
    torch.set_num_threads(1)

    pre = MolmoPreprocessor(PreprocessConfig(), build_tokenizer())
    rows = []
    for width, height in SIZES:
        data = synthetic_jpeg(width, height)
        grid = pre.image_grid(width, height)
        results = measure(methods(pre, data), args.seconds)
        decode = results["decode only"]["cpu_ms"]
        for name, r in results.items():
            rows.append({"size": f"{width}x{height}", "grid": f"{grid[0]}x{grid[1]}",
                         "crops": 1 + grid[0] * grid[1], "jpeg_kb": round(len(data) / 1024, 1),
                         "method": name, **r, "x_decode": r["cpu_ms"] / decode,
                         "x_exact": r["cpu_ms"] / results["exact"]["cpu_ms"]})  # fmt: skip

    header = (
        f"{'size':>10} {'grid':>5} {'method':<18} {'CPU/image':>10} {'x decode':>9} "
        f"{'x exact':>8} {'to engine':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['size']:>10} {r['grid']:>5} {r['method']:<18} {r['cpu_ms']:>8.1f}ms "
            f"{r['x_decode']:>8.2f}x {r['x_exact']:>7.2f}x {r['engine_bytes'] / 1e6:>8.2f}MB"
        )
    info = describe_machine(with_vllm=False)
    print(f"\nmachine: {info}")
    meta = {"baseline": "exact", "floor": "decode only", "threads": 1, "clock": "process_time"}
    write_results("preprocess", rows, meta=meta, machine=info)


if __name__ == "__main__":
    main()
