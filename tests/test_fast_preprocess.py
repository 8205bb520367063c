"""The fast image path (molmo_model/fast_preprocessing.py) against the exact one.

Proves:
- same grid, tokens, patch order and image masks as `MolmoPreprocessor.preprocess`, under
  both image-mask rules (the checkpoint's rule is honoured exactly), for images that are
  up-scaled, down-scaled (a 12 MP one through the box reduction), thin, or not resized;
- uint8 crops (a quarter of float32's bytes) that `normalize_uint8` turns into the exact
  path's pixels within TOLERANCE (mean |diff| in the normalized range, about [-1.8, 2.2]),
  and bit for bit where no resize happens;
- the server's default is the exact path, `--fast-preprocessing` selects the fast one;
- through vLLM (`vllm` marker, tiny decisive checkpoint): a bare engine's default is the fast
  path (vLLM's `mm_device_do_normalize`, declared by our model), and its greedy tokens and
  first-token logprobs equal the PyTorch reference fed the same uint8 crops normalized by
  `normalize_uint8` (so the device-side normalization is the same arithmetic).

    pytest tests/test_fast_preprocess.py -q        # ~1 min on 2 cores (one engine)
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import assert_same_greedy, blocks_image, noise_image, vllm_engine

from molmo_model.config import AI2_MASK_RULE, PER_CROP_MASK_RULE, PreprocessConfig
from molmo_model.fast_preprocessing import fast_preprocess, normalize_uint8
from molmo_model.generate import generate
from molmo_model.preprocessing import MolmoPreprocessor

TOLERANCE = 0.01  # mean |fast - exact| after normalization
LOGPROB_ATOL = 5e-4  # as tests/test_vllm_parity.py

SIZES = [(336, 336), (640, 480), (480, 640), (1920, 1080), (4000, 3000), (50, 800), (700, 90)]


def _normalized(pre: MolmoPreprocessor, inputs) -> torch.Tensor:
    cfg = pre.config
    return normalize_uint8(inputs.images, cfg.image_mean, cfg.image_std, torch.float32)


@pytest.mark.parametrize("rule", [AI2_MASK_RULE, PER_CROP_MASK_RULE])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_fast_matches_exact_within_tolerance(tok, size, rule) -> None:
    pre = MolmoPreprocessor(PreprocessConfig(image_mask_rule=rule), tok)
    image = blocks_image(*size, seed=size[0])
    exact, fast = pre.preprocess(image), fast_preprocess(pre, image)
    assert fast.images.dtype == torch.uint8 and fast.images.shape == exact.images.shape
    assert fast.images.nbytes * 4 == exact.images.nbytes
    assert (fast.rows, fast.cols, fast.width, fast.height) == (
        exact.rows, exact.cols, exact.width, exact.height
    )  # fmt: skip
    assert fast.tokens == exact.tokens
    assert torch.equal(fast.patch_order, exact.patch_order)
    assert torch.equal(fast.image_masks, exact.image_masks)
    diff = (_normalized(pre, fast) - exact.images).abs()
    assert diff.mean() <= TOLERANCE, (size, float(diff.mean()))
    if size == (336, 336):  # neither view is resized: the same arithmetic, bit for bit
        assert torch.equal(_normalized(pre, fast), exact.images)


def test_noise_stays_within_tolerance(tok) -> None:
    # The worst case for rounding the resize to uint8: every pixel differs from its neighbours.
    pre = MolmoPreprocessor(PreprocessConfig(), tok)
    for size in [(640, 480), (1500, 1000)]:
        image = noise_image(*size, seed=1)
        diff = (_normalized(pre, fast_preprocess(pre, image)) - pre.preprocess(image).images).abs()
        assert diff.mean() <= TOLERANCE, (size, float(diff.mean()))


def test_normalize_uint8_is_the_exact_arithmetic() -> None:
    cfg = PreprocessConfig()
    x = torch.arange(588, dtype=torch.int64).remainder(256).to(torch.uint8).view(1, 1, 588)
    got = normalize_uint8(x, cfg.image_mean, cfg.image_std, torch.float32).view(196, 3)
    values = x.view(196, 3).float() / 255.0
    want = (values - torch.tensor(cfg.image_mean)) / torch.tensor(cfg.image_std)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.vllm
def test_vllm_fast_path_matches_reference_on_the_same_crops(decisive_checkpoint) -> None:
    from vllm import SamplingParams

    from molmo_vllm.prompt import build_prompt

    path, model, tok = decisive_checkpoint
    pre = MolmoPreprocessor(model.config.preprocess, tok)
    images = [blocks_image(640, 480, seed=2), noise_image(1000, 700, seed=3)]
    question = "Point to the red square."
    params = SamplingParams(temperature=0.0, max_tokens=10, logprobs=5, ignore_eos=True)
    with vllm_engine(path) as llm:  # vLLM's defaults: the fast path
        assert llm.llm_engine.model_config.multimodal_config.mm_device_do_normalize
        outs = llm.generate(
            [build_prompt(tok, question, [im]) for im in images], params, use_tqdm=False
        )
    for image, out in zip(images, outs, strict=True):
        ids, _ = pre.build_prompt(question, [image])
        fast = fast_preprocess(pre, image)
        inputs = dataclasses.replace(fast, images=_normalized(pre, fast))
        ref = generate(model, ids, [inputs], max_new_tokens=10, return_logprobs=True)
        assert list(out.prompt_token_ids) == ids
        got = out.outputs[0]
        assert_same_greedy(list(got.token_ids), ref.tokens, ref.logprobs)
        first = {i: lp.logprob for i, lp in got.logprobs[0].items()}
        for i, lp in first.items():
            assert abs(lp - float(ref.logprobs[0][i])) < LOGPROB_ATOL, (i, lp)


def test_server_defaults_to_the_exact_path() -> None:
    pytest.importorskip("vllm")
    from server.cli import DEMO_MODEL, config_from_args
    from server.engine import engine_args

    exact = engine_args(config_from_args(["--model", str(DEMO_MODEL)]))
    fast = engine_args(config_from_args(["--model", str(DEMO_MODEL), "--fast-preprocessing"]))
    assert exact.mm_device_do_normalize is False and fast.mm_device_do_normalize is True
