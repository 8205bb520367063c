"""Reference generator: one prompt at a time through `MolmoForCausalLM` with a KV cache.

It is the ground truth for the vLLM adapter's parity tests and for evaluation without an
engine. Greedy when temperature is 0; otherwise temperature / top-k / top-p sampling.

    from molmo_model.generate import generate
    out = generate(model, input_ids, image_inputs, max_new_tokens=32, eos_id=tok.eos_id)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from molmo_model.model import KVCache, MolmoForCausalLM


def stack_image_inputs(
    image_inputs: Sequence[Any], tokens_per_crop: int
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Concatenates several images' crops (`ImageInputs` from the preprocessor) into the
    tensors `MolmoForCausalLM.embed` takes: images [C, N, P], masks [C, N], and patch_order
    offset so that it indexes the concatenated pooled features [C * tokens_per_crop]."""
    if not image_inputs:
        return None, None, None
    images, masks, orders, offset = [], [], [], 0
    for inp in image_inputs:
        images.append(inp.images)
        masks.append(inp.image_masks)
        orders.append(inp.patch_order + offset)
        offset += inp.images.shape[0] * tokens_per_crop
    return torch.cat(images), torch.cat(masks), torch.cat(orders)


@dataclass
class GenerationResult:
    tokens: list[int]  # generated ids, EOS included when it was produced
    logprobs: list[torch.Tensor] = field(default_factory=list)  # per step: log-softmax [V]
    finish_reason: str = "length"  # "stop" when EOS was produced


@torch.no_grad()
def generate(
    model: MolmoForCausalLM,
    input_ids: Sequence[int],
    image_inputs: Sequence[Any] | None = None,
    max_new_tokens: int = 32,
    eos_id: int | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    return_logprobs: bool = False,
) -> GenerationResult:
    model.eval()
    device = model.device
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=device)
    images, masks, order = stack_image_inputs(
        image_inputs or [], model.model.vision_backbone.tokens_per_crop
    )
    if images is not None:
        images, masks, order = images.to(device), masks.to(device), order.to(device)
    gen = torch.Generator(device="cpu")
    if seed is not None:
        gen.manual_seed(seed)

    cache = KVCache.empty(model.config.llm.num_hidden_layers)
    embeds = model.embed(ids, images, masks, order)
    return generate_from_embeds(
        model, ids, embeds, cache, max_new_tokens, eos_id, temperature, top_k, top_p, gen,
        return_logprobs,
    )  # fmt: skip


@torch.no_grad()
def generate_from_embeds(
    model: Any,
    ids: torch.Tensor,
    embeds: torch.Tensor,
    cache: KVCache,
    max_new_tokens: int,
    eos_id: int | None,
    temperature: float,
    top_k: int,
    top_p: float,
    gen: torch.Generator,
    return_logprobs: bool,
    **prefill_kwargs: Any,
) -> GenerationResult:
    """The decode loop of either Molmo family: prefill the prompt's embeddings [1, S, d]
    (ids [1, S]) into an empty `cache`, then one token at a time. `model(ids, cache=,
    inputs_embeds=, **prefill_kwargs).logits` is all it asks of the model."""
    device = ids.device
    logits = model(ids, cache=cache, inputs_embeds=embeds, **prefill_kwargs).logits[:, -1]  # [1, V]
    result = GenerationResult(tokens=[])
    for _ in range(max_new_tokens):
        logp = torch.log_softmax(logits.float(), dim=-1)[0]
        if return_logprobs:
            result.logprobs.append(logp.cpu())
        nxt = _pick(logp, temperature, top_k, top_p, gen)
        result.tokens.append(nxt)
        if eos_id is not None and nxt == eos_id:
            result.finish_reason = "stop"
            break
        step = torch.tensor([[nxt]], dtype=torch.long, device=device)
        logits = model(step, cache=cache).logits[:, -1]
    return result


def _pick(
    logp: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator
) -> int:
    if temperature <= 0:
        return int(torch.argmax(logp))
    scores = (logp / temperature).cpu()
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_p.cumsum(0) - sorted_p > top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter(0, idx, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
