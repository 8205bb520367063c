"""Fidelity to Ai2's own Molmo code: our PyTorch reference and vLLM with our plugin (fp32)
reproduce the numbers Ai2's released code computes on a release-layout checkpoint.

The checkpoint (tests/ai2_release.py, seeded) is in the layout of Molmo-7B-D-0924: the
release's config.json (no image-mask field, so Ai2's rule applies), full ViT-L, a tiny LLM,
the image tokens at 152064.., non-zero pad_embed and new_embedding. For five images of
different grids, all with partial padding (1x1 resized in neither view, 1x2, 2x1, a tiny
40x30, an extreme 700x90), both engines must give the golden prompt ids, the golden greedy
tokens and first-token log-probabilities within 1e-3 of the golden top 5. The goldens
cover Ai2's image-mask rule (shifted masks, -1 as partial padding) and its adding of image
features to the `<im_patch>` embeddings (vLLM's built-in Molmo replaces them);
`test_the_goldens_see_mask_rule_and_add_not_replace` shows that either change breaks them.

How tests/golden/ai2_molmo_7b_d.json was made (once, outside the repository; none of Ai2's
code is here): Ai2's released HF remote code for Molmo-7B-D-0924 (modeling_molmo.py,
config_molmo.py, image_preprocessing_molmo.py, preprocessing_molmo.py, from a public
GitHub mirror of the HF repository, named in the file) ran with transformers 5.19.0 and
torch 2.13.0+cpu on this checkpoint. Its MolmoProcessor.process(text=PROMPT, images=image)
gave the prompt ids, crops, image masks and image_input_idx; its MolmoForCausalLM (all
weights loaded strictly, float32) decoded NEW_TOKENS greedy tokens with the inputs its own
generate_from_batch passes (attention mask, position ids, key-value cache); the top 5
log-softmax values of the first token were recorded. Two shims were needed: the released
image processor resizes with TensorFlow (not installed), so the torchvision branch that the
same function carries commented out (the resize of Ai2's PyTorch repository, and the one
our preprocessor matches) was switched on; and torchvision (not installable beside the CPU
torch) was a stand-in whose Resize makes the call torchvision makes,
F.interpolate(bilinear, antialias=True). The 336x200 image is resized in neither view, so
its goldens hold under TensorFlow's resize too.

Run: pytest tests/test_ai2_golden.py -q     (one vLLM engine; ~2 min on 2 cores)
"""

from __future__ import annotations

import json
from pathlib import Path

import ai2_release
import pytest
import torch
from helpers import vllm_engine

from molmo_model.checkpoint import load_checkpoint
from molmo_model.generate import generate
from molmo_model.preprocessing import MolmoPreprocessor
from molmo_vllm.prompt import build_prompt

pytestmark = pytest.mark.vllm

GOLDEN = json.loads((Path(__file__).parent / "golden" / "ai2_molmo_7b_d.json").read_text())
NAMES = [name for name, *_ in ai2_release.IMAGES]
LOGPROB_ATOL = 1e-3


def _image(name: str):
    (_, width, height, seed) = next(r for r in ai2_release.IMAGES if r[0] == name)
    return ai2_release.image(width, height, seed)


def _assert_top5(got: dict[int, float], golden: dict) -> float:
    """Every golden top-5 token within LOGPROB_ATOL; returns the largest difference."""
    diffs = [abs(got[i] - lp) for i, lp in golden["top5_first_logprobs"]]
    assert max(diffs) < LOGPROB_ATOL, diffs
    return max(diffs)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    path = ai2_release.build_release_checkpoint(tmp_path_factory.mktemp("ai2") / "release")
    model, config, tok = load_checkpoint(path)  # bf16 on disk, float32 here as in vLLM
    assert config.preprocess.image_mask_rule == "ai2"
    return path, model.eval(), MolmoPreprocessor(config.preprocess, tok)


@pytest.fixture(scope="module")
def reference_inputs(release):
    _, _, pre = release
    return {name: pre.build_prompt(GOLDEN["prompt"], [_image(name)]) for name in NAMES}


def test_golden_recipes_are_the_builders():
    assert GOLDEN["prompt"] == ai2_release.PROMPT
    for name, width, height, seed in ai2_release.IMAGES:
        g = GOLDEN["images"][name]
        assert (g["width"], g["height"], g["seed"]) == (width, height, seed)
        assert len(g["greedy_tokens"]) == ai2_release.NEW_TOKENS


@pytest.mark.parametrize("name", NAMES)
def test_reference_matches_ai2(release, reference_inputs, name):
    _, model, _ = release
    golden = GOLDEN["images"][name]
    ids, inputs = reference_inputs[name]
    assert ids == golden["prompt_ids"]
    assert inputs[0].n_crops == golden["n_crops"]
    assert inputs[0].image_masks[:, 0].tolist() == golden["mask_rows_first_patch"]
    out = generate(model, ids, inputs, max_new_tokens=ai2_release.NEW_TOKENS, return_logprobs=True)
    assert out.tokens == golden["greedy_tokens"]
    _assert_top5({i: float(out.logprobs[0][i]) for i, _ in golden["top5_first_logprobs"]}, golden)


def test_the_goldens_see_mask_rule_and_add_not_replace(release, reference_inputs):
    """Serving the release with per-crop masks, or replacing the `<im_patch>` embeddings by
    the image features, moves the first-token log-probabilities far past the tolerance."""
    _, model, pre = release
    name = "tiny_40x30"
    golden = GOLDEN["images"][name]
    ids, inputs = reference_inputs[name]
    top5 = [i for i, _ in golden["top5_first_logprobs"]]
    want = torch.tensor([lp for _, lp in golden["top5_first_logprobs"]])

    def first_token_error(image_inputs) -> float:
        out = generate(model, ids, image_inputs, max_new_tokens=1, return_logprobs=True)
        return float((out.logprobs[0][top5] - want).abs().max())

    geo = model.config.preprocess  # the preprocessor's and the backbone's config alike
    assert model.model.vision_backbone.geo is geo and pre.config is geo
    geo.image_mask_rule = "per_crop"
    try:
        assert first_token_error([pre.preprocess(_image(name))]) > 100 * LOGPROB_ATOL
    finally:
        geo.image_mask_rule = "ai2"

    embedding = model.model.transformer.wte.new_embedding
    row = model.im_patch_id - model.config.llm.embedding_size
    saved = embedding[row].detach().clone()
    with torch.no_grad():
        embedding[row] = 0.0  # adding the features to a zero row is replacing it
    try:
        assert first_token_error(inputs) > 100 * LOGPROB_ATOL
    finally:
        with torch.no_grad():
            embedding[row] = saved


def test_vllm_matches_ai2(release):
    from vllm import SamplingParams

    path, _, pre = release
    params = SamplingParams(
        temperature=0.0, max_tokens=ai2_release.NEW_TOKENS, logprobs=5, ignore_eos=True
    )
    # The server's prompt builder, so the prompt under test is the one that is served.
    prompts = [build_prompt(pre.tokenizer, GOLDEN["prompt"], [_image(name)]) for name in NAMES]
    with vllm_engine(  # the exact path (float32 crops), the one that matches Ai2 exactly
        path,
        limit_mm_per_prompt={"image": 1},
        max_num_seqs=len(NAMES),
        mm_device_do_normalize=False,
    ) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
    worst = 0.0
    for name, out in zip(NAMES, outs, strict=True):
        golden = GOLDEN["images"][name]
        assert list(out.prompt_token_ids) == golden["prompt_ids"], name
        got = out.outputs[0]
        assert list(got.token_ids) == golden["greedy_tokens"], name
        first = {i: lp.logprob for i, lp in got.logprobs[0].items()}
        assert set(first) >= {i for i, _ in golden["top5_first_logprobs"]}, name
        worst = max(worst, _assert_top5(first, golden))
    print(f"largest first-token log-prob difference to Ai2's code: {worst:.2e}")
