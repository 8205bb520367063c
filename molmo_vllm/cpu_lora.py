"""A fix for vLLM 0.32's CPU LoRA ops: rows without an adapter must get no adapter.

vLLM marks the tokens of requests that use no adapter with the LoRA index -1; its Triton
kernels (GPU) skip them. The PyTorch ops its CPU platform runs instead
(`vllm/lora/ops/torch_ops/lora_ops.py`) gather `lora_weights[indices]`, and -1 picks the LAST
adapter slot: in a batch that mixes base requests with adapter requests, the base rows get
that slot's adapter whenever it is occupied (always with --max-loras 1). Measured here: a tiny
base with two adapters and max_loras=2, batched base/a/b, gave wrong base answers on all four
prompts; the same requests one model at a time were right. vLLM has open fixes for it
(vllm-project/vllm pull requests 48421 and 49656), not in 0.32.

`patch()` replaces the three gather ops, where the CPU LoRA wrapper and the `sgmv_*` prefill
ops look them up, with versions that zero the update of rows whose index is -1. Rows with an
adapter get exactly what they got before. It runs in every engine process through
`molmo_vllm.register()` (the plugin entry point), on the CPU platform only, and does nothing
once vLLM's ops skip -1 themselves (`_fixed_upstream`).
"""

from __future__ import annotations

import torch

_patched = False


def _gather(weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapters of each row ([B, out, in]; -1 rows get slot 0's, zeroed later) and the
    mask of rows that have one ([B, 1])."""
    keep = (indices >= 0)[:, None]  # [B, 1]
    selected = weights[indices.clamp(min=0)].to(dtype=dtype)
    if selected.ndim == 4:  # [B, 1, out, in]
        selected = selected.squeeze(dim=1)
    return selected, keep


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    selected, keep = _gather(lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=output_tensor.dtype), selected)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs * keep


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    selected, keep = _gather(lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=output_tensor.dtype), selected) * keep
    limit = 1 if outputs.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    common = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int,
                      slice_size: int, add_inputs: bool = True):  # fmt: skip
    selected, keep = _gather(lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=output_tensor.dtype), selected) * keep
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs


def _fixed_upstream() -> bool:
    """Whether vLLM's own shrink op already gives a -1 row no update."""
    from vllm.lora.ops.torch_ops import lora_ops

    weights = torch.ones(2, 1, 1, 1)
    out = torch.zeros(1, 1)
    lora_ops.bgmv_shrink(torch.ones(1, 1), weights, out, torch.tensor([-1]), 1.0)
    return bool(out.abs().sum() == 0)


def patch() -> None:
    """Install the fixed ops where vLLM's CPU LoRA path calls them (idempotent)."""
    global _patched
    if _patched:
        return
    _patched = True
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.lora.ops import torch_ops
    from vllm.lora.ops.torch_ops import lora_ops

    if _fixed_upstream():
        return
    from vllm.lora.punica_wrapper import punica_cpu

    fixed = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice}
    for module in (lora_ops, torch_ops, punica_cpu):  # the sgmv_* ops call lora_ops' globals
        for name, fn in fixed.items():
            if hasattr(module, name):
                setattr(module, name, fn)
