"""Two fixes for vLLM 0.32's CPU backend, installed by the plugin (`molmo_vllm.register()`,
in every engine process) on the CPU platform only.

1. LoRA: rows without an adapter must get no adapter (`patch_lora_ops`).
2. Pipeline parallelism in eager mode: a later stage needs its buffer for the previous stage's
   hidden states (`patch_pp_eager`).

1. vLLM marks the tokens of requests that use no adapter with the LoRA index -1; its Triton
kernels (GPU) skip them. The PyTorch ops its CPU platform runs instead
(`vllm/lora/ops/torch_ops/lora_ops.py`) gather `lora_weights[indices]`, and -1 picks the LAST
adapter slot: in a batch that mixes base requests with adapter requests, the base rows get
that slot's adapter whenever it is occupied (always with --max-loras 1). Measured here: a tiny
base with two adapters and max_loras=2, batched base/a/b, gave wrong base answers on all four
prompts; the same requests one model at a time were right. vLLM has open fixes for it
(vllm-project/vllm pull requests 48421 and 49656), not in 0.32.

`patch_lora_ops()` replaces the three gather ops, where the CPU LoRA wrapper and the `sgmv_*` prefill
ops look them up, with versions that zero the update of rows whose index is -1. Rows with an
adapter get exactly what they got before. It does nothing once vLLM's ops skip -1
themselves (`_lora_fixed_upstream`).

2. A pipeline stage after the first receives the previous stage's hidden states into a buffer
(`model_runner.intermediate_tensors`) that vLLM's runner makes in its dummy run. The CPU
runner does that dummy run only when it compiles the model (`warming_up_model` returns at
once under --enforce-eager), so an eager PP=2 engine died on its first request (an assertion
in `sync_and_gather_intermediate_tensors`); compiled, the same engine answered. The fix makes
the buffer, as the dummy run would, once the KV cache is set up (`initialize_kv_cache`, which
both modes run), when it is still missing.
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


_UPSTREAM: dict = {}  # vLLM's own ops, once patch_lora_ops has replaced them


def upstream_op(name: str):
    """vLLM's own `name` op (bgmv_shrink, ...), whether or not the fix is installed."""
    from vllm.lora.ops.torch_ops import lora_ops

    return _UPSTREAM.get(name) or getattr(lora_ops, name)


def _lora_fixed_upstream() -> bool:
    """Whether vLLM's own shrink op already gives a -1 row no update."""
    weights = torch.ones(2, 1, 1, 1)
    out = torch.zeros(1, 1)
    upstream_op("bgmv_shrink")(torch.ones(1, 1), weights, out, torch.tensor([-1]), 1.0)
    return bool(out.abs().sum() == 0)


def patch() -> None:
    """Both fixes, on the CPU platform (idempotent)."""
    global _patched
    if _patched:
        return
    _patched = True
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    patch_lora_ops()
    patch_pp_eager()


def patch_pp_eager() -> None:
    """Make a later pipeline stage's intermediate-tensor buffer after the KV cache is set up."""
    from vllm.distributed import get_pp_group
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    original = CPUModelRunner.initialize_kv_cache
    if getattr(original, "_molmo_fixed", False):
        return

    def initialize_kv_cache(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if not get_pp_group().is_first_rank and getattr(self, "intermediate_tensors", None) is None:
            self.intermediate_tensors = self.model.make_empty_intermediate_tensors(
                batch_size=self.max_num_tokens, dtype=self.model_config.dtype, device=self.device
            )

    initialize_kv_cache._molmo_fixed = True  # type: ignore[attr-defined]
    CPUModelRunner.initialize_kv_cache = initialize_kv_cache


def patch_lora_ops() -> None:
    """Install the fixed LoRA ops where vLLM's CPU LoRA path calls them."""
    from vllm.lora.ops import torch_ops
    from vllm.lora.ops.torch_ops import lora_ops

    if _lora_fixed_upstream():
        return
    from vllm.lora.punica_wrapper import punica_cpu

    fixed = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice}
    for name in fixed:
        _UPSTREAM.setdefault(name, getattr(lora_ops, name))
    for module in (lora_ops, torch_ops, punica_cpu):  # the sgmv_* ops call lora_ops' globals
        for name, fn in fixed.items():
            if hasattr(module, name):
                setattr(module, name, fn)
