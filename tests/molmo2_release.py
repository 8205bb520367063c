"""The seeded random-weight checkpoint, tokenizer and inputs of the Molmo 2 golden test
(tests/test_molmo2_golden.py), rebuilt in-repo from the recipe recorded in
tests/golden/ai2_molmo2.json: the very tensors and prompts Ai2's released code ran on.

* Checkpoint: Molmo2-4B's config.json with a tiny decoder (hidden 128, 4 heads of 64, 2 KV
  heads, 2 layers, MLP 256); the full SigLIP 2 tower (25 stored blocks) and connector; the
  real vocabulary size. Every tensor is drawn on its own: a CPU generator seeded with
  crc32("<SEED>:<name>"), randn(shape, float32) * std + mean, rounded to bfloat16, (mean, std)
  from the first WEIGHT_RULES key found in the name. Stored in bf16, read back as float32.
* Tokenizer: byte-level with no merges: ids 0..255 are the 256 byte symbols in GPT-2 / Qwen
  order (so "\\n" = 198 and " " = 220 as in Qwen3), fillers up to 151642, then Qwen3's 26 added
  tokens (151643..), Ai2's 267 padding specials (151669..151935) and Molmo 2's 10 tokens at
  151936..151945, all special. Text ids differ from Qwen3's BPE; every special id is real.
* Inputs: `blocks_image` (a background and 18 seeded rectangles/ellipses) and
  `video_frames` (one such picture with a white box moving right).

    python tests/molmo2_release.py OUT_DIR     # writes the checkpoint (~900 MB)
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from molmo_model.molmo2.config import Molmo2Config
from molmo_model.molmo2.model import Molmo2ForConditionalGeneration
from molmo_model.tokenizer import Molmo2Tokenizer

GOLDEN_PATH = Path(__file__).parent / "golden" / "ai2_molmo2.json"
SEED = 0
# (substring of the tensor name, mean, std): the first match names the draw.
WEIGHT_RULES = (
    ("lm_head.weight", 0.0, 0.4),
    ("wte.embedding", 0.0, 0.5),
    ("wte.new_embedding", 0.0, 0.5),
    ("positional_embedding", 0.0, 0.5),
    ("patch_embedding.weight", 0.0, 0.05),
    ("image_projector.w2.weight", 0.0, 0.05),
    ("norm.weight", 1.0, 0.1),  # every LayerNorm / RMSNorm gain, q/k norms included
    ("ln_f.weight", 1.0, 0.1),
    ("norm.bias", 0.0, 0.05),
    (".bias", 0.0, 0.02),
    ("transformer.blocks.", 0.0, 0.05),  # decoder linears
    (".weight", 0.0, 0.02),  # ViT and connector linears
)

PROMPT = "Describe this image."
TWO_IMAGE_PROMPT = "Compare these two images."
VIDEO_PROMPT = "What happens in this video?"
NEW_TOKENS = 12
IMAGES = {
    "single_640x480": (640, 480, 1),
    "pair_a_300x500": (300, 500, 2),
    "pair_b_120x90": (120, 90, 3),
}
VIDEO = {"frames": 4, "width": 320, "height": 240, "seed": 4, "fps": 2.0}


def golden() -> dict:
    return json.loads(GOLDEN_PATH.read_text())


def release_config() -> dict:
    """The config.json Ai2's code ran with (the golden records it)."""
    return golden()["config"]


# ---------------------------------------------------------------- weights


def weight_rule(name: str, rules: tuple = WEIGHT_RULES) -> tuple[float, float]:
    for key, mean, std in rules:
        if key in name:
            return mean, std
    raise KeyError(name)


def tensor_seed(name: str, seed: int = SEED) -> int:
    return zlib.crc32(f"{seed}:{name}".encode())


def draw(
    name: str, shape: tuple[int, ...], seed: int = SEED, rules: tuple = WEIGHT_RULES
) -> torch.Tensor:
    """One tensor of the checkpoint, bfloat16."""
    mean, std = weight_rule(name, rules)
    gen = torch.Generator().manual_seed(tensor_seed(name, seed))
    x = torch.randn(shape, generator=gen, dtype=torch.float32)
    return x.mul_(std).add_(mean).to(torch.bfloat16)


def release_state(config: Molmo2Config, rules: tuple = WEIGHT_RULES) -> dict[str, torch.Tensor]:
    """Every tensor our model (hence the release) names, drawn by the recipe (bf16)."""
    with torch.device("meta"):
        shell = Molmo2ForConditionalGeneration(config)
    return {name: draw(name, tuple(p.shape), rules=rules) for name, p in shell.state_dict().items()}


# ---------------------------------------------------------------- tokenizer

QWEN3_ADDED = (  # Qwen3's added tokens, ids 151643..151668
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
)  # fmt: skip
QWEN3_BASE_VOCAB = 151643  # BPE ids before the added tokens
EMBEDDING_SIZE = 151936  # Molmo 2's tokens start here
MOLMO2_TOKENS = ("<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<low_res_im_start>",
                 "<|image|>", "<im_low>", "<frame_start>", "<frame_end>", "<|video|>")  # fmt: skip


def byte_symbols() -> list[str]:
    """The printable symbol of each byte-level token, in GPT-2's (and Qwen's) id order: the
    188 printable bytes in byte order (as themselves), then the other 68 bytes in byte order
    (as chr(256 + k))."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    rest = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + k) for k in range(len(rest))]


def release_tokenizer() -> Molmo2Tokenizer:
    """Byte-level, the release's special ids, and its BOS = EOS = `<|im_end|>` (what vLLM's
    processor reads from tokenizer_config.json)."""
    vocab = {ch: i for i, ch in enumerate(byte_symbols())}
    vocab.update({f"<unused_{i}>": i for i in range(len(vocab), QWEN3_BASE_VOCAB)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    pad = [
        f"|<EXTRA_TOKENS_{i}>|" for i in range(EMBEDDING_SIZE - QWEN3_BASE_VOCAB - len(QWEN3_ADDED))
    ]
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t in (*QWEN3_ADDED, *pad, *MOLMO2_TOKENS)
        ]
    )
    out = Molmo2Tokenizer(tok)
    assert (
        out.token_to_id("<|im_end|>") == 151645 and out.token_to_id("<im_start>") == EMBEDDING_SIZE
    )
    assert out.token_to_id("<|video|>") == EMBEDDING_SIZE + 9 and out.total_size == 151946
    return out


# ---------------------------------------------------------------- checkpoint


def build_release_checkpoint(out_dir: str | Path) -> Path:
    """Writes config.json, model.safetensors (bf16) and the tokenizer to out_dir."""
    cfg = release_config()
    state = release_state(Molmo2Config.from_hf_dict(cfg))
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    del state
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    release_tokenizer().save(path)
    return path


# ---------------------------------------------------------------- inputs


def blocks_image(width: int, height: int, seed: int) -> Image.Image:
    """numpy default_rng(seed): background colour (3 ints), then 18 shapes, each an x pair,
    a y pair (sorted) and a colour; the first 12 filled rectangles, the last 6 ellipses."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw_ = ImageDraw.Draw(img)
    for k in range(18):
        x0, x1 = sorted(int(v) for v in rng.integers(0, width, 2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, height, 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw_.rectangle if k < 12 else draw_.ellipse)([x0, y0, x1, y1], fill=fill)
    return img


def image(name: str) -> Image.Image:
    return blocks_image(*IMAGES[name])


def video_frames() -> np.ndarray:
    """uint8 [frames, h, w, 3]: blocks_image(w, h, seed) with a 60x40 white box whose top-left
    corner is at (k * w // frames, h // 3) in frame k."""
    n, w, h = VIDEO["frames"], VIDEO["width"], VIDEO["height"]
    base = blocks_image(w, h, VIDEO["seed"])
    frames = []
    for k in range(n):
        frame = base.copy()
        x = k * w // n
        ImageDraw.Draw(frame).rectangle([x, h // 3, x + 60, h // 3 + 40], fill=(255, 255, 255))
        frames.append(np.asarray(frame))
    return np.stack(frames)


if __name__ == "__main__":
    print(build_release_checkpoint(sys.argv[1]))
