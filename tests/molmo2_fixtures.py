"""Inputs for the Molmo 2 preprocessing tests, shared with the script that made the goldens.

* `molmo2_tokenizer()`: our small BPE with Molmo 2's special tokens at the ids of the
  Molmo2-4B/8B release (Qwen3's chat tokens at 151643..151645, the image and video tokens at
  151936..151945). Text ids differ from Qwen3's BPE; the special ids and the layout do not.
* `IMAGES` and `image()`: seeded noise images of varied sizes and aspect ratios.
* `PROMPT`, `TWO_IMAGE_PROMPT`: the questions used.
"""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from tokenizers import Tokenizer

from molmo_model.tokenizer import MolmoTokenizer, build_tokenizer

# Molmo2-4B's added_tokens.json (the 8B release uses the same Qwen3 ids).
RELEASE_SPECIAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<im_start>": 151936,
    "<im_end>": 151937,
    "<im_patch>": 151938,
    "<im_col>": 151939,
    "<low_res_im_start>": 151940,
    "<|image|>": 151941,
    "<im_low>": 151942,
    "<frame_start>": 151943,
    "<frame_end>": 151944,
    "<|video|>": 151945,
}

# (name, width, height, seed): 1x1 at the crop size, small, wide, tall, large, extreme.
IMAGES = [
    ("square_378", 378, 378, 0),
    ("photo_640x480", 640, 480, 1),
    ("portrait_480x640", 480, 640, 2),
    ("tiny_40x30", 40, 30, 3),
    ("wide_1000x150", 1000, 150, 4),
    ("large_1920x1080", 1920, 1080, 5),
    ("odd_517x333", 517, 333, 6),
]
PROMPT = "What is in this image?"
TWO_IMAGE_PROMPT = "Compare these images."


def image(width: int, height: int, seed: int) -> Image.Image:
    """Seeded RGB noise with smooth structure (so resizing is not trivially averaging)."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    y, x = np.mgrid[0:height, 0:width]
    ramp = ((x * 255) // max(width - 1, 1)).astype(np.uint8)
    noise[..., 0] = (noise[..., 0] // 2 + ramp // 2).astype(np.uint8)
    noise[..., 1] = ((y * 255) // max(height - 1, 1)).astype(np.uint8)
    return Image.fromarray(noise, mode="RGB")


def named_image(name: str) -> Image.Image:
    _, width, height, seed = next(r for r in IMAGES if r[0] == name)
    return image(width, height, seed)


QWEN3_BASE_VOCAB = 151936  # Molmo 2's image tokens follow Qwen3's vocabulary


def molmo2_tokenizer() -> MolmoTokenizer:
    spec = json.loads(build_tokenizer()._tok.to_str())
    # Keep our BPE (ids < 512), fill the vocabulary up to Qwen3's size with unused tokens, put
    # Qwen3's chat tokens at their ids and Molmo 2's image/video tokens after the vocabulary
    # (v1's image tokens at 512..516 are dropped).
    vocab = spec["model"]["vocab"]
    vocab.pop("<|endoftext|>")  # id 0 becomes an unused filler
    by_id = {i: t for t, i in vocab.items()}
    by_id[0] = "<|unused_0|>"
    for i in range(len(by_id), QWEN3_BASE_VOCAB):
        by_id[i] = f"<|unused_{i}|>"
    for token, i in RELEASE_SPECIAL_IDS.items():
        by_id[i] = token
    spec["model"]["vocab"] = {t: i for i, t in sorted(by_id.items()) if i < QWEN3_BASE_VOCAB}
    spec["added_tokens"] = [
        {"id": i, "content": token, "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": True}
        for token, i in sorted(RELEASE_SPECIAL_IDS.items(), key=lambda kv: kv[1])
    ]  # fmt: skip
    return MolmoTokenizer(Tokenizer.from_str(json.dumps(spec)))
