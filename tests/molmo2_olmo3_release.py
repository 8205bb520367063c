"""The seeded random-weight checkpoint and tokenizer of the Molmo 2 OLMo 3 golden test
(tests/test_molmo2_olmo3_golden.py), rebuilt from the recipe recorded in
tests/golden/ai2_molmo2_olmo3.json: the tensors and prompts Ai2's released code ran on.

* Checkpoint: Molmo 2's config.json with Molmo2-O-7B's decoder kind (norm_after, q/k RMSNorm
  over all heads, no biases, MHA, rope_theta 5e5, the release's yarn rope_scaling) at tiny
  size: hidden 128, 4 heads of 64, 4 layers, yarn on layers 1 and 3 (the release: 3, 7, ...,
  31), MLP 256; OLMo 3's vocabulary size 100278 + 128 and the token ids that follow it; a tiny
  vision tower and connector (molmo2-tiny's dims) on the real image geometry (378 px crops,
  14 px patches, 27x27 positions), so the case runs in seconds. Drawn by molmo2_release's
  recipe (crc32("<SEED>:<name>") seeds, bf16) with WEIGHT_RULES below.
* Tokenizer: byte-level with no merges (ids 0..255 the byte symbols), fillers up to 100256,
  OLMo 2/3's special-token block 100257..100277 (<|endoftext|> 100257, <|im_start|> 100264,
  <|im_end|> 100265, <|pad|> 100277; the rest placeholders), Molmo 2's 10 tokens at
  100278..100287. bos <|endoftext|>, eos <|im_end|>, pad <|pad|> (tokenizer_config.json).

    python tests/molmo2_olmo3_release.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import molmo2_release
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from molmo_model.molmo2.config import Molmo2Config
from molmo_model.tokenizer import MOLMO2_TOKENS, Molmo2Tokenizer

GOLDEN_PATH = Path(__file__).parent / "golden" / "ai2_molmo2_olmo3.json"
# Post-norm sublayers each add a unit-RMS vector; gains ~0.25 keep the token embedding visible
# in the residual stream (so greedy tokens vary). The first matching rule wins.
WEIGHT_RULES = (
    ("attn_norm.weight", 0.25, 0.05),
    ("ff_norm.weight", 0.25, 0.05),
    *molmo2_release.WEIGHT_RULES,
)
OLMO_VOCAB = 100278  # Olmo-3-7B-Instruct's embedding rows; Molmo 2's tokens follow
OLMO_SPECIAL_START = 100257
OLMO_SPECIALS = {100257: "<|endoftext|>", 100264: "<|im_start|>", 100265: "<|im_end|>", 100277: "<|pad|>"}
BOS, EOS, PAD = "<|endoftext|>", "<|im_end|>", "<|pad|>"


def golden() -> dict:
    return json.loads(GOLDEN_PATH.read_text())


def release_tokenizer() -> Molmo2Tokenizer:
    vocab = {ch: i for i, ch in enumerate(molmo2_release.byte_symbols())}
    vocab.update({f"<unused_{i}>": i for i in range(len(vocab), OLMO_SPECIAL_START)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = [
        OLMO_SPECIALS.get(i, f"<|olmo_special_{i}|>") for i in range(OLMO_SPECIAL_START, OLMO_VOCAB)
    ]
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (*specials, *MOLMO2_TOKENS)]
    )
    out = Molmo2Tokenizer(tok, bos=BOS, eos=EOS, pad=PAD)
    assert out.token_to_id("<im_start>") == OLMO_VOCAB and out.total_size == OLMO_VOCAB + 10
    return out


def build_release_checkpoint(out_dir: str | Path) -> Path:
    """config.json, model.safetensors (bf16) and the tokenizer, in out_dir."""
    cfg = golden()["config"]
    state = molmo2_release.release_state(Molmo2Config.from_hf_dict(cfg), rules=WEIGHT_RULES)
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    release_tokenizer().save(path)
    return path


if __name__ == "__main__":
    print(build_release_checkpoint(sys.argv[1]))
