"""The Triton kernels against their PyTorch references: outputs and every gradient.

Not collected by a plain `pytest` run (the name does not start with `test_`):
`tests/test_kernels.py` runs this file in a child process, once with `TRITON_INTERPRET=1` so the
kernels execute on the CPU through Triton's interpreter, and once natively where CUDA exists.
The interpreter must be switched on before the kernel modules are imported, which one pytest
session shared with other test files cannot promise; a child process can. Run it by hand with

    TRITON_INTERPRET=1 PYTHONPATH=. python -m pytest tests/kernel_cases/kernel_vs_reference.py

Each case draws fp32/fp16/bf16 inputs, runs the kernel, and compares with the reference run on
float32 copies of the same inputs, within the dtype's (atol, rtol). Shapes stay small: the
interpreter runs one program after another in NumPy.
"""

import os

import pytest
import torch

from kernels.annotation_attention import annotation_attention, annotation_attention_reference
from kernels.attention_pool import attention_pool, attention_pool_reference

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETING else "cuda"
pytestmark = pytest.mark.skipif(
    not INTERPRETING and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 or a CUDA device",
)

NATIVE_CUDA = pytest.mark.skipif(
    DEVICE != "cuda", reason="bf16 needs a GPU: Triton's interpreter has no bfloat16 dot"
)
DTYPES = [
    pytest.param(torch.float32, 1e-4, 1e-4, id="fp32"),
    pytest.param(torch.float16, 5e-3, 5e-3, id="fp16"),
    pytest.param(torch.bfloat16, 3e-2, 3e-2, id="bf16", marks=NATIVE_CUDA),
]


def _leaves(
    gen: torch.Generator, dtype: torch.dtype, *shapes: tuple[int, ...]
) -> list[torch.Tensor]:
    return [
        torch.randn(shape, generator=gen).to(device=DEVICE, dtype=dtype).requires_grad_()
        for shape in shapes
    ]


def _compare(fn_kernel, fn_reference, inputs, atol, rtol) -> list[torch.Tensor]:
    """Run the kernel on `inputs` and the reference on float32 copies, backward through both
    with one random output gradient; assert output and input gradients agree. Returns the
    kernel's [output, grads...] as float32."""
    shadow = [x.detach().float().requires_grad_() for x in inputs]
    out = fn_kernel(*inputs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out.backward(grad_out.to(out.dtype))
    ref = fn_reference(*shadow)
    ref.backward(grad_out)
    got = [out.detach().float()] + [x.grad.float() for x in inputs]
    want = [ref.detach()] + [x.grad for x in shadow]
    for name, g, w in zip(
        ["output"] + [f"grad[{i}]" for i in range(len(inputs))], got, want, strict=True
    ):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")
    return got


# --------------------------------------------------------------------------- attention_pool


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize(
    "n, k, h, d",
    [
        (1, 4, 1, 16),
        (7, 4, 2, 32),
        (37, 4, 16, 64),  # 592 rows: many programs, the last one ragged
        (13, 1, 2, 16),  # a single member: softmax is 1, dq is 0
        (9, 2, 16, 32),
        (5, 3, 1, 24),  # K and D not powers of two: masked lanes
    ],
)
def test_attention_pool_kernel_matches_reference(n, k, h, d, dtype, atol, rtol):
    gen = torch.Generator().manual_seed(n * 100 + k * 10 + h)
    inputs = _leaves(gen, dtype, (n, h, d), (n, k, h, d), (n, k, h, d))
    kernel = lambda q, kk, v: attention_pool(q, kk, v, backend="triton")  # noqa: E731
    got = _compare(kernel, attention_pool_reference, inputs, atol, rtol)
    assert got[0].shape == (n, h, d)


# --------------------------------------------------------------------- annotation_attention


def _segments(gen: torch.Generator, b: int, s: int) -> torch.Tensor:
    """[B, S] ids: row 0 opens with 3 padding tokens (rows that see nothing), row 1 has no
    prefix, others a random prefix; then annotations of 1..9 tokens, then 0..4 padding."""
    rows = []
    for i in range(b):
        lead = 3 if i == 0 else 0
        prefix = 0 if i == 1 else int(torch.randint(1, max(2, s // 3), (), generator=gen))
        tail = int(torch.randint(0, 5, (), generator=gen))
        row = [-1] * lead + [0] * prefix
        ann = 1
        while len(row) < s - tail:
            row += [ann] * int(torch.randint(1, 10, (), generator=gen))
            ann += 1
        rows.append(row[: s - tail] + [-1] * tail)
    return torch.tensor(rows, dtype=torch.int64)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize(
    "b, hq, hkv, s, d",
    [
        (1, 1, 1, 16, 16),  # one tile
        (2, 4, 2, 37, 16),  # GQA, S not a multiple of the tile
        (2, 3, 3, 17, 32),
        (1, 4, 1, 50, 64),  # four query heads per kv head
        (1, 2, 1, 33, 128),
    ],
)
def test_annotation_attention_kernel_matches_reference(b, hq, hkv, s, d, dtype, atol, rtol):
    gen = torch.Generator().manual_seed(b * 1000 + s * 10 + d)
    seg = _segments(gen, b, s).to(DEVICE)
    inputs = _leaves(gen, dtype, (b, hq, s, d), (b, hkv, s, d), (b, hkv, s, d))
    kernel = lambda q, k, v: annotation_attention(q, k, v, seg, backend="triton")  # noqa: E731
    reference = lambda q, k, v: annotation_attention_reference(q, k, v, seg)  # noqa: E731
    out, dq, dk, dv = _compare(kernel, reference, inputs, atol, rtol)
    # Row 0's leading padding sees no key: exact zeros out and back.
    assert out[0, :, :3].abs().max() == 0 and dq[0, :, :3].abs().max() == 0


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES[:2])
def test_annotation_attention_kernel_strided_inputs(dtype, atol, rtol):
    """q, k, v as views of [B, S, H, D] projections, as a model produces them."""
    b, hq, hkv, s, d = 2, 4, 2, 21, 32
    gen = torch.Generator().manual_seed(7)
    seg = _segments(gen, b, s).to(DEVICE)
    base = _leaves(gen, dtype, (b, s, hq, d), (b, s, hkv, d), (b, s, hkv, d))
    views = [x.transpose(1, 2) for x in base]  # [B, H, S, D], not contiguous
    assert not views[0].is_contiguous()
    kernel = lambda q, k, v: annotation_attention(  # noqa: E731
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), seg, backend="triton"
    )
    reference = lambda q, k, v: annotation_attention_reference(  # noqa: E731
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), seg
    )
    _compare(kernel, reference, base, atol, rtol)


def test_annotation_attention_kernel_single_annotation_is_causal():
    """All-prefix ids: the kernel equals plain causal SDPA."""
    b, h, s, d = 1, 2, 40, 32
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, h, s, d, generator=gen).to(DEVICE) for _ in range(3))
    seg = torch.zeros(b, s, dtype=torch.int64, device=DEVICE)
    got = annotation_attention(q, k, v, seg, backend="triton")
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
