"""molmo_vllm/cpu_fixes.py, part 1: vLLM 0.32's CPU LoRA ops, fixed for rows without an adapter.

Rows with an adapter get exactly vLLM's result; rows whose index is -1 get no update (vLLM's
own op gives them the last slot's adapter: checked here too, so this test says when an
upgrade of vLLM makes the fix unnecessary). The end-to-end case (base, a and b batched on
one server) is in tests/test_server_lora.py; part 2 (eager pipeline parallelism) is tested
by tests/test_server_scale.py's PP=2 case.

    pytest tests/test_vllm_cpu_fixes.py -q
"""

from __future__ import annotations

import pytest
import torch

lora_ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")
from molmo_vllm import cpu_fixes  # noqa: E402

SLOTS, B, IN, R, OUT = 3, 6, 16, 4, 12
INDICES = torch.tensor([0, -1, 2, 1, -1, 2])


def _case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, IN, generator=g), torch.randn(SLOTS, 1, R, IN, generator=g),
            torch.randn(B, R, generator=g), torch.randn(SLOTS, 1, OUT, R, generator=g),
            torch.randn(B, OUT + 4, generator=g))  # fmt: skip


def test_shrink_expand_and_slice_skip_rows_without_an_adapter():
    x, a, h, b, y0 = _case()
    keep = INDICES >= 0
    for theirs, ours, args in (
        ("bgmv_shrink", cpu_fixes.bgmv_shrink, lambda out: (x, a, out, INDICES, 0.5)),
        ("bgmv_expand", cpu_fixes.bgmv_expand, lambda out: (h, b, out, INDICES, True)),
        ("bgmv_expand_slice", cpu_fixes.bgmv_expand_slice, lambda out: (h, b, out, INDICES, 2, OUT, True)),
    ):  # fmt: skip
        theirs = cpu_fixes.upstream_op(theirs)  # vLLM's, even once an engine in this process patched it
        want, got = y0.clone(), y0.clone()
        theirs(*args(want))
        ours(*args(got))
        assert torch.equal(got[keep], want[keep])  # rows with an adapter: vLLM's result exactly
        if ours is cpu_fixes.bgmv_shrink:
            assert torch.all(got[~keep][:, :R] == 0)  # the shrink buffer of a -1 row holds nothing
        else:
            assert torch.equal(got[~keep], y0[~keep])  # a -1 row's output is left as it was


def test_patching_keeps_vllms_op_for_these_checks():
    cpu_fixes.patch_lora_ops()  # as an engine started earlier in this process would have
    assert lora_ops.bgmv_shrink is cpu_fixes.bgmv_shrink
    assert cpu_fixes.upstream_op("bgmv_shrink") is not cpu_fixes.bgmv_shrink


def test_vllms_own_op_still_needs_the_fix():
    x, a, _, _, y0 = _case(1)
    out = torch.zeros(B, R)
    cpu_fixes.upstream_op("bgmv_shrink")(x, a, out, INDICES, 1.0)
    assert not torch.all(out[~(INDICES >= 0)] == 0), "vLLM now skips -1 rows: drop molmo_vllm/cpu_fixes.py"
