"""Shared pieces of the vLLM tests (not a test module): checkpoints, engines, images.

Random tiny models give near-uniform logits, where a 1e-6 difference between two correct
implementations can flip a greedy choice. `decisive_tiny_checkpoint` scales the untied
output head so that logits spread over several nats and greedy choices have margins far
above float32 noise, while everything upstream keeps the usual small init.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from molmo_model.checkpoint import save_checkpoint
from molmo_model.config import MolmoConfig, tiny
from molmo_model.model import MolmoForCausalLM
from molmo_model.tokenizer import MolmoTokenizer, build_tokenizer

TIE_MARGIN = 1e-3  # a greedy step may differ only where the reference's top-2 gap is below this
HEAD_SCALE = 8.0  # lm-head std 0.05 * 8 = 0.4: logits std ~4.5 nats for unit-RMS hidden states


def decisive_model(config: MolmoConfig, tok: MolmoTokenizer, seed: int = 0) -> MolmoForCausalLM:
    torch.manual_seed(seed)
    model = MolmoForCausalLM(config, im_patch_id=tok.im_patch_id).init_weights(std=0.05, seed=seed)
    with torch.no_grad():
        model.model.transformer.ff_out.weight.mul_(HEAD_SCALE)
        # Image features large enough to move the logits: the projector's output scale.
        model.model.vision_backbone.image_projector.w2.weight.mul_(4.0)
    return model.eval()


def decisive_tiny_checkpoint(
    out: Path, seed: int = 0
) -> tuple[Path, MolmoForCausalLM, MolmoTokenizer]:
    tok = build_tokenizer()
    config = tiny(vocab_size=tok.vocab_size)
    model = decisive_model(config, tok, seed)
    save_checkpoint(model, out, tok)
    return out, model, tok


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def blocks_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Coarse random colour blocks: an image whose crops differ visibly from each other."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, height // 40), max(1, width // 40), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.NEAREST)


@contextlib.contextmanager
def vllm_engine(model_dir: Path, **kwargs) -> Iterator[object]:
    """One `vllm.LLM` in eager mode with float32 weights (parity with the fp32 reference)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    args = dict(
        model=str(model_dir),
        enforce_eager=True,
        dtype="float32",
        max_model_len=4096,
        seed=0,
        limit_mm_per_prompt={"image": 4},
    )
    args.update(kwargs)
    llm = LLM(**args)
    try:
        yield llm
    finally:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def assert_same_greedy(
    got: list[int], ref_tokens: list[int], ref_logprobs: list[torch.Tensor]
) -> None:
    """Equal tokens; a divergence is tolerated only at a genuine near-tie of the reference
    (top-2 gap < TIE_MARGIN), after which the sequences are not compared further."""
    for i, (a, b) in enumerate(zip(got, ref_tokens, strict=True)):
        if a == b:
            continue
        top2 = torch.topk(ref_logprobs[i], 2).values
        gap = float(top2[0] - top2[1])
        assert gap < TIE_MARGIN, f"step {i}: vLLM chose {a}, reference {b} (top-2 gap {gap:.4f})"
        return
