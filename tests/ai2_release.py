"""A seeded random-weight checkpoint in the layout of Ai2's Molmo-7B-D-0924 release, and the
image recipes of the golden test against Ai2's own code (tests/test_ai2_golden.py).

The checkpoint is what Ai2's released HF code can load: config.json with exactly the
release's fields (auto_map included, no vision fields) and a tiny LLM; the full ViT-L tower
(Ai2's code hard-codes it); a stand-in tokenizer with Molmo-7B-D's vocabulary size, so the
image tokens sit at the release's ids 152064..152068. Weights are normal(0.02) from a fixed
seed, stored as bf16 (every reader upcasts the same values to float32), with a non-zero
`pad_embed` and `new_embedding`, a scaled output head (wide greedy margins) and scaled image
features, so that the mask rule and how image features enter the embeddings move the logits.

    python tests/ai2_release.py OUT_DIR     # writes the checkpoint (~20 s, ~700 MB)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from helpers import OFFICIAL_FIELDS, blocks_image
from PIL import Image

from molmo_model.checkpoint import save_checkpoint
from molmo_model.config import MolmoConfig
from molmo_model.model import MolmoForCausalLM
from molmo_model.tokenizer import build_tokenizer

SEED = 0
# The release's config.json with a tiny LLM (head dim 64: vLLM's CPU attention has it).
RELEASE_FIELDS = {**OFFICIAL_FIELDS, "hidden_size": 128, "intermediate_size": 512,
                  "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 2,
                  "torch_dtype": "bfloat16"}  # fmt: skip

PROMPT = "Describe this image."
NEW_TOKENS = 8
# (name, width, height, seed): grids 1x1 (no resize in either view), 1x2, 2x1, a tiny image
# (up-scaled, 1x1) and an extreme aspect ratio (1x1); every one has partial padding.
IMAGES = (
    ("no_resize_336x200", 336, 200, 1),
    ("wide_480x250", 480, 250, 2),
    ("tall_250x480", 250, 480, 3),
    ("tiny_40x30", 40, 30, 4),
    ("extreme_700x90", 700, 90, 5),
)


def image(width: int, height: int, seed: int) -> Image.Image:
    return blocks_image(width, height, seed=seed)


def build_release_checkpoint(out_dir: str | Path) -> Path:
    """Writes the checkpoint to out_dir (replaced if there) and returns its path."""
    config = MolmoConfig.from_hf_dict(RELEASE_FIELDS)
    assert config.preprocess.image_mask_rule == "ai2"  # a release's config names no rule
    tok = build_tokenizer(vocab_size=config.llm.embedding_size)
    assert (tok.im_start_id, tok.image_id) == (152064, 152068)  # Molmo-7B-D's ids
    torch.manual_seed(SEED)
    model = MolmoForCausalLM(config, im_patch_id=tok.im_patch_id).init_weights(std=0.02, seed=SEED)
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        model.model.transformer.ff_out.weight.mul_(20.0)  # std 0.4: logits spread over nats
        model.model.vision_backbone.image_projector.w2.weight.mul_(8.0)
        vb = model.model.vision_backbone
        vb.pad_embed.copy_(torch.randn(vb.pad_embed.shape, generator=gen))
        new = model.model.transformer.wte.new_embedding
        new.copy_(torch.randn(new.shape, generator=gen))  # <im_patch>'s row: unit scale
    path = save_checkpoint(model, out_dir, tok, dtype="bfloat16")
    # Exactly the release's config.json: auto_map and transformers_version, no vision fields.
    (path / "config.json").write_text(json.dumps(RELEASE_FIELDS, indent=2) + "\n")
    return path


if __name__ == "__main__":
    print(build_release_checkpoint(sys.argv[1]))
