"""Fidelity to Ai2's own Molmo 2 code for the OLMo 3 decoder (Molmo2-O-7B's kind): post-norm
blocks (norm_after), q/k RMSNorm over all heads ("olmo"), yarn RoPE on the
rope_scaling_layers and the plain RoPE on the other layers. Our reference
(molmo_model/molmo2, float32) and our vLLM model reproduce, for one image and for two images,
the prompt ids, the 12 greedy tokens and the first-token log-probabilities (within 1e-3;
measured ~1e-5) that Ai2's released code computed on the same checkpoint.

The checkpoint (tests/molmo2_olmo3_release.py, rebuilt here and checked tensor by tensor
against the golden's sums): a 4-layer OLMo 3 decoder (hidden 128, 4 heads of 64, yarn on
layers 1 and 3 with the release's yarn values), OLMo 3's vocabulary size 100278 + 128 and the
image token ids after it, a tiny vision tower on the real image geometry; the tokenizer is
byte-level with OLMo's special-token block, BOS <|endoftext|> (not Qwen's <|im_end|>).

How tests/golden/ai2_molmo2_olmo3.json was made (once, outside the repository; none of Ai2's
code is here): as tests/golden/ai2_molmo2.json (see tests/test_molmo2_golden.py: Ai2's HF
files at the commit the golden names, transformers 5.19.0, torch 2.13.0+cpu, one thread,
the same shims), with this config; the golden also records the inverse frequencies of
Ai2's two rotary embeddings (transformers' yarn and default inits).

Run: pytest tests/test_molmo2_olmo3_golden.py -q --durations=0
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import molmo2_olmo3_release
import molmo2_release
import pytest
import torch
from helpers import vllm_engine
from safetensors import safe_open
from test_molmo2_golden import engine_matches_golden, reference_matches_golden, threads

from molmo_model.checkpoint import load_checkpoint
from molmo_model.generate import generate_from_embeds
from molmo_model.model import KVCache
from molmo_model.molmo2.model import yarn_inv_freq
from molmo_model.molmo2.preprocessing import Molmo2PreprocessConfig, Molmo2Preprocessor
from molmo_model.tokenizer import Molmo2Tokenizer

GOLDEN = molmo2_olmo3_release.golden()
LOGPROB_ATOL = 1e-3
CASES = {  # name: (question, image names)
    "single_image": (molmo2_release.PROMPT, ["single_640x480"]),
    "two_images": (molmo2_release.TWO_IMAGE_PROMPT, ["pair_a_300x500", "pair_b_120x90"]),
}


@pytest.fixture(scope="module")
def release(molmo2_olmo3_release_path: Path):
    model, _, _ = load_checkpoint(molmo2_olmo3_release_path, with_tokenizer=False)
    tok = Molmo2Tokenizer.from_dir(molmo2_olmo3_release_path)
    return model.eval(), Molmo2Preprocessor(Molmo2PreprocessConfig(), tok, tok.BOS)


@pytest.fixture(scope="module")
def runs(release):
    """case -> (inputs, prompt embeddings with image features, generation)."""
    model, pre = release
    done = {}

    def run(case: str):
        if case not in done:
            question, names = CASES[case]
            with threads(1):  # the images' resize, as the goldens were made
                inputs = pre.build_prompt(question, [molmo2_release.image(n) for n in names])
            mm = inputs.model_inputs()
            ids, tti = mm.pop("input_ids"), mm.pop("token_type_ids")
            with torch.inference_mode():
                embeds = model.embed(ids, **mm)
                cache = KVCache.empty(model.config.text.num_hidden_layers)
                out = generate_from_embeds(
                    model, ids, embeds.clone(), cache, GOLDEN["new_tokens"], None, 0.0, 0, 1.0,
                    torch.Generator(), True, token_type_ids=tti,
                )  # fmt: skip
            done[case] = (inputs, embeds, out)
        return done[case]

    return run


def test_rebuilt_checkpoint_and_tokenizer_are_the_ones_ai2_ran(molmo2_olmo3_release_path: Path):
    with safe_open(str(molmo2_olmo3_release_path / "model.safetensors"), "pt") as f:
        shapes = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
        assert shapes == {name: shape for name, shape in GOLDEN["tensors"]}
        for name, check in GOLDEN["tensor_checks"].items():
            t = f.get_tensor(name)
            assert float(t.double().sum()) == pytest.approx(
                check["sum_fp32_of_bf16"], rel=1e-12, abs=1e-9
            ), name
    assert molmo2_olmo3_release.WEIGHT_RULES == tuple(tuple(r) for r in GOLDEN["weight_rules"])
    tok = Molmo2Tokenizer.from_dir(molmo2_olmo3_release_path)
    g = GOLDEN["tokenizer"]
    assert tok.total_size == g["len"]
    assert {t: tok.token_to_id(t) for t in g["special"]} == g["special"]
    assert (tok.bos_id, tok.eos_id) == (g["bos_id"], g["eos_id"])  # 100257, 100265


def test_yarn_is_ais_rotary():
    """Our yarn frequencies are, bit for bit, what transformers' yarn init gave Ai2's
    "scaling" rotary (and the plain ones its "default"); the attention factor is the same."""
    text = GOLDEN["config"]["text_config"]
    ai2 = GOLDEN["ai2_rotary"]
    inv, scale = yarn_inv_freq(text["head_dim"], text["rope_theta"], text["rope_scaling"])
    assert inv.tolist() == ai2["scaling_inv_freq"]
    assert scale == ai2["scaling_attention_scaling"] == pytest.approx(0.1 * math.log(8) + 1, abs=1e-15)
    d = text["head_dim"]
    plain = 1.0 / (text["rope_theta"] ** (torch.arange(0, d, 2).float() / d))
    assert plain.tolist() == ai2["default_inv_freq"]
    moved = (inv / plain).tolist()  # high-frequency pairs kept, low ones divided by the factor
    assert moved[0] == 1.0 and moved[-1] == pytest.approx(1 / 8)


@pytest.mark.parametrize("case", list(CASES))
def test_reference_matches_ai2(runs, case):
    golden = GOLDEN["cases"][case]
    inputs, _, out = runs(case)
    assert inputs.input_ids.tolist() == golden["prompt_ids"]
    assert golden["prompt_ids"][0] == GOLDEN["tokenizer"]["bos_id"]
    assert out.tokens == golden["greedy_tokens"]
    worst = reference_matches_golden(out, golden)
    print(f"{case}: largest log-prob difference to Ai2's code {worst:.2e}")


def test_the_golden_sees_the_per_layer_rope(release, runs):
    """Yarn on every layer, or on none, moves the first-token log-probs far past the
    tolerance: the golden pins which layers take which rotary."""
    model, _ = release
    golden = GOLDEN["cases"]["single_image"]
    inputs, embeds, _ = runs("single_image")
    top5 = [i for i, _ in golden["top5_first_logprobs"]]
    want = torch.tensor([lp for _, lp in golden["top5_first_logprobs"]], dtype=torch.float64)
    text = model.config.text
    variants = {"as released": text,
                "yarn nowhere": dataclasses.replace(text, rope_scaling=None),
                "yarn everywhere": dataclasses.replace(text, rope_scaling_layers=None)}  # fmt: skip
    moved = {}
    try:
        for name, cfg in variants.items():
            model.config.text = cfg
            with torch.inference_mode():
                logits = model(
                    inputs.input_ids[None], inputs_embeds=embeds.clone(),
                    token_type_ids=inputs.token_type_ids[None],
                ).logits[0, -1]  # fmt: skip
            lp = torch.log_softmax(logits.float(), -1).double()[top5]
            moved[name] = float((lp - want).abs().max())
    finally:
        model.config.text = text
    print("first-token top-5 log-prob move:", {k: f"{v:.3g}" for k, v in moved.items()})
    assert moved["as released"] < LOGPROB_ATOL
    assert moved["yarn nowhere"] > 10 * LOGPROB_ATOL and moved["yarn everywhere"] > 10 * LOGPROB_ATOL, moved


@pytest.mark.vllm
def test_vllm_matches_ai2(molmo2_olmo3_release_path: Path):
    """Our vLLM model (post-norm blocks, OLMo q/k norm, vLLM's yarn on layers 1 and 3, its
    bidirectional image prefill), prompts from the server's prompt builder: Ai2's prompt ids,
    12 greedy tokens and first-token top 5 within 1e-3, one image and two images."""
    from vllm import SamplingParams

    from molmo_vllm.prompt import build_prompt

    tok = Molmo2Tokenizer.from_dir(molmo2_olmo3_release_path)
    cases = list(CASES)
    with threads(1):
        prompts = [
            build_prompt(tok, CASES[c][0], [molmo2_release.image(n) for n in CASES[c][1]])
            for c in cases
        ]
    params = SamplingParams(temperature=0.0, max_tokens=GOLDEN["new_tokens"], logprobs=5, ignore_eos=True)
    with vllm_engine(molmo2_olmo3_release_path, max_model_len=2048, max_num_seqs=2,
                     limit_mm_per_prompt={"image": 2, "video": 1}, skip_mm_profiling=True) as llm:  # fmt: skip
        outs = llm.generate(prompts, params, use_tqdm=False)
    worst = engine_matches_golden(outs, cases, GOLDEN)
    print(f"vLLM: largest first-token log-prob difference to Ai2's code {worst:.2e}")
