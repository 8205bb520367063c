"""Multi-annotation packing vs one annotation per sequence: one epoch of the same data.

Both arms train the same model (the `demo` shape, or `--model tiny`) from the same weights on
the same synthetic images with the same optimizer; only the layout differs:

on two data settings (the demo's scenes, the generator's default mixture):

- `packed` (ours, the paper's): each image once, all its annotations after it
  (training/packing.py), `--batch` images per step;
- `one-per-sequence` (the baseline): every annotation in its own sequence with its own
  copy of the image, `--batch` sequences per step.

Reported per epoch: images encoded by the ViT, sequences, tokens (non-padding), wall time,
tokens/s and images/s. The paper reports two thirds fewer images encoded and more than
halved training time with packing. Writes benchmarks/results/training_<device>.json/.csv
with the machine that produced them.

    python benchmarks/training.py                 # 16 images, demo model, 1 thread
    python benchmarks/training.py --images 32 --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would hide the
# `training` package: put the repository root there instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import torch  # noqa: E402

from benchmarks.report import write_results  # noqa: E402
from molmo_model.model import MolmoForCausalLM  # noqa: E402
from molmo_model.preprocessing import MolmoPreprocessor  # noqa: E402
from molmo_model.tokenizer import build_tokenizer  # noqa: E402
from training.config import DEMO_SCENE, DataConfig, ModelSpec  # noqa: E402
from training.data.synthetic import SyntheticDataset  # noqa: E402
from training.packing import collate, pack_example, split_annotations  # noqa: E402
from training.recipe import OPTIM_PRESETS, build_optimizer, init_from_scratch  # noqa: E402


def run_epoch(model, optimizer, sequences, batch: int, pad_id: int, tokens_per_crop: int, device) -> dict:
    """Trains one pass over `sequences` (PackedExamples) in batches; returns the counts."""
    model.train()
    t0 = time.perf_counter()
    images = tokens = loss_tokens = 0
    for i in range(0, len(sequences), batch):
        b = collate(sequences[i : i + batch], pad_id, tokens_per_crop).to(device)
        out = model(**b.model_inputs())
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        images += b.n_images
        tokens += int((b.segment_ids >= 0).sum())
        loss_tokens += b.n_loss_tokens
    seconds = time.perf_counter() - t0
    return {
        "sequences": len(sequences),
        "images_encoded": images,
        "tokens": tokens,
        "loss_tokens": loss_tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "images_per_s": images / seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=16, help="images in the epoch")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--model", default="demo", help="model preset (molmo_model.config.PRESETS: demo, tiny)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)

    tok = build_tokenizer()
    config = ModelSpec(preset=a.model, max_crops=1).build(tok.embedding_size)
    pre = MolmoPreprocessor(config.preprocess, tok)
    t = config.preprocess.tokens_per_side**2
    # The demo's scenes (about 2 questions per image) and the generator's default mixture
    # (more questions, captions, 20% clocks with one question each).
    settings = {
        "demo": DataConfig(scene=dict(DEMO_SCENE), clock_fraction=0.0).synthetic(),
        "default": DataConfig().synthetic(),
    }
    rows, summary = [], {}
    for data_name, synthetic in settings.items():
        data = SyntheticDataset("train", a.images, synthetic)
        examples = [data[i] for i in range(len(data))]
        arms = {
            "packed": [pack_example(e, pre) for e in examples],
            "one-per-sequence": [pack_example(s, pre) for e in examples for s in split_annotations(e)],
        }
        pair = []
        for name, sequences in arms.items():
            torch.manual_seed(0)
            model = init_from_scratch(MolmoForCausalLM(config, im_patch_id=tok.im_patch_id), seed=0).to(device)
            optimizer, _ = build_optimizer(model, OPTIM_PRESETS["demo"], total_steps=100)
            run_epoch(model, optimizer, sequences[: a.batch], a.batch, tok.pad_id, t, device)  # warm-up
            pair.append({"data": data_name, "arm": name,
                         **run_epoch(model, optimizer, sequences, a.batch, tok.pad_id, t, device)})  # fmt: skip
        packed, base = pair
        summary[data_name] = {
            "images_encoded_reduction": 1 - packed["images_encoded"] / base["images_encoded"],
            "speedup": base["seconds"] / packed["seconds"],
            "annotations_per_image": base["sequences"] / packed["sequences"],
        }
        rows += pair

    print(f"{'data':8s} {'arm':18s} {'seqs':>5s} {'images':>6s} {'tokens':>7s} {'seconds':>8s} {'tok/s':>8s}")
    for r in rows:
        print(f"{r['data']:8s} {r['arm']:18s} {r['sequences']:5d} {r['images_encoded']:6d} {r['tokens']:7d} "
              f"{r['seconds']:8.1f} {r['tokens_per_s']:8.0f}")  # fmt: skip
    for data_name, s in summary.items():
        print(f"{data_name}: packing encodes {s['images_encoded_reduction']:.0%} fewer images and is "
              f"{s['speedup']:.2f}x faster per epoch ({s['annotations_per_image']:.2f} annotations/image)")  # fmt: skip

    tag = "cuda" if device.type == "cuda" else "cpu"
    write_results(f"training_{tag}", rows, meta={"baseline": "one-per-sequence", "model": a.model, "images": a.images,
                                                 "batch": a.batch, "summary": summary})  # fmt: skip


if __name__ == "__main__":
    main()
