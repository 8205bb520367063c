"""The vision side's matrix multiplies through vLLM's own CPU GEMM.

Our vLLM models run the vision side as molmo_model's plain PyTorch modules (one vision
implementation for the reference, training and serving). Their `nn.Linear` layers call
torch's `F.linear`; vLLM's own linear layers on its CPU platform call what
`dispatch_cpu_unquantized_gemm` picks instead (oneDNN with the weight packed once, or
sgl-kernel's packed GEMM for small bf16 weights). On this 2-core AVX-512 CPU, at the SigLIP 2
tower's shapes (3645 rows: 5 crops of 729 patches) oneDNN runs 300-370 GFLOP/s where
`F.linear` runs 150-180, and vLLM's built-in Molmo 2 tower, built from vLLM's layers, took
11.1 s where ours took 21.1 s (experiments/results/molmo2_builtin_vs_ours_cpu_vision.json).

`use_engine_gemm(module)` hands every plain `nn.Linear` under `module` to that same dispatch
after the weights are loaded, so the modules stay molmo_model's own and only their GEMM
changes. The dispatch packs a copy of the weight; the original is then dropped
(`remove_weight`), as vLLM does for its own layers, so memory does not grow; a model that
loads weights again first calls `use_plain_gemm`, which gives the layers back empty weights of
their shapes to load into. Outputs move by float32 rounding only (a different summation
order). Off the CPU platform nothing changes.
"""

from __future__ import annotations

import types

import torch
from torch import nn

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _engine_linear(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return self.cpu_linear(x, self.weight, self.bias)


def use_engine_gemm(module: nn.Module) -> int:
    """Routes the plain `nn.Linear` layers under `module` through vLLM's CPU GEMM dispatch
    (CPU platform only, after loading; the layers' weights are packed and then dropped).
    Returns how many layers now use it."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return 0
    n = 0
    for layer in module.modules():
        if type(layer) is not nn.Linear or hasattr(layer, "cpu_linear"):
            continue
        w = layer.weight
        if w.ndim != 2 or w.dtype not in _FLOATS or w.is_meta or w.numel() == 0:
            continue
        layer.plain_weight_shape = tuple(w.shape)
        dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
        layer.forward = types.MethodType(_engine_linear, layer)
        n += 1
    return n


def use_plain_gemm(module: nn.Module) -> int:
    """Undoes `use_engine_gemm` (before weights are loaded again): each such layer gets an
    empty weight of its shape and torch's `F.linear` back. Returns how many."""
    n = 0
    for layer in module.modules():
        shape = getattr(layer, "plain_weight_shape", None)
        if shape is None:
            continue
        dtype, device = layer.weight.dtype, layer.weight.device
        layer.weight = nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)
        del layer.cpu_linear, layer.forward, layer.plain_weight_shape
        n += 1
    return n
