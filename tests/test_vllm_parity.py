"""Our Molmo served through vLLM (the plugin in molmo_vllm/) against the
PyTorch reference generator (molmo_model/generate.py), on a tiny random-weight checkpoint.

One engine for the whole module (eager, float32). Proves:
- the expanded prompt ids equal `MolmoPreprocessor.build_prompt`'s, for prompts built with
  `molmo_vllm.prompt.build_prompt` (`<|image|>` placeholders) and for plain text prompts (images after BOS);
- greedy tokens equal the reference's and first-token logprobs agree within LOGPROB_ATOL, for
  no image, 336x336, 640x480, 480x640, 2000x150, two images and a multi-turn chat;
- the images matter (a different image changes the logits), so the parity is not vacuous;
- 16 concurrent requests with different images give the tokens they give one at a time;
- a prompt with a wrong number of placeholders is refused with a message saying so.

Run: pytest tests/test_vllm_parity.py -q
"""

from __future__ import annotations

import pytest
from helpers import assert_same_greedy, blocks_image, noise_image, vllm_engine

from molmo_model.generate import generate
from molmo_model.preprocessing import MolmoPreprocessor
from molmo_vllm.prompt import build_prompt, parse_chat

pytestmark = pytest.mark.vllm

NEW_TOKENS = 12
LOGPROB_ATOL = 5e-4  # float32 through different kernels; observed differences are ~1e-5


@pytest.fixture(scope="module")
def setup(decisive_checkpoint):
    path, model, tok = decisive_checkpoint
    pre = MolmoPreprocessor(model.config.preprocess, tok)
    with vllm_engine(path, mm_device_do_normalize=False) as llm:  # the exact path
        yield llm, model, tok, pre


def _params(max_tokens: int = NEW_TOKENS, logprobs: int | None = 5):
    from vllm import SamplingParams

    return SamplingParams(
        temperature=0.0, max_tokens=max_tokens, logprobs=logprobs, ignore_eos=True
    )


def _reference(model, pre, messages, images, max_new_tokens: int = NEW_TOKENS):
    ids, inputs = pre.build_prompt(parse_chat(messages).turns, images)
    out = generate(model, ids, inputs, max_new_tokens=max_new_tokens, return_logprobs=True)
    return ids, out


CASES = {
    "text_only": ("What is the capital of France?", []),
    "336x336": ("Describe this image.", [(336, 336, 1)]),
    "640x480": ("Point to the red square.", [(640, 480, 2)]),
    "480x640": ("How many circles are there?", [(480, 640, 3)]),
    "2000x150": ("What does the banner say?", [(2000, 150, 4)]),
    "two_images": ("Compare the two images.", [(640, 480, 5), (336, 336, 6)]),
    "multi_turn": (
        [
            {
                "role": "user",
                "content": [{"type": "image_url"}, {"type": "text", "text": "What is it?"}],
            },
            {"role": "assistant", "content": "A clock."},
            {"role": "user", "content": "What time is it?"},
        ],
        [(500, 400, 7)],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_and_logprobs_match_reference(setup, case):
    llm, model, tok, pre = setup
    messages, specs = CASES[case]
    images = [blocks_image(w, h, seed) for w, h, seed in specs]
    ref_ids, ref = _reference(model, pre, messages, images)

    out = llm.generate(build_prompt(tok, messages, images), _params(), use_tqdm=False)[0]

    assert list(out.prompt_token_ids) == ref_ids  # placeholders expanded exactly as Molmo's layout
    got = list(out.outputs[0].token_ids)
    assert_same_greedy(got, ref.tokens, ref.logprobs)
    first = out.outputs[0].logprobs[0]  # token id -> Logprob, top-5 (+ the chosen one)
    assert len(first) >= 5
    for token_id, lp in first.items():
        assert abs(lp.logprob - float(ref.logprobs[0][token_id])) < LOGPROB_ATOL, token_id


def test_text_prompt_gets_images_after_bos(setup):
    """The documented offline form: a plain text prompt without BOS or placeholder."""
    llm, model, tok, pre = setup
    image = noise_image(640, 480, seed=11)
    ref_ids, ref = _reference(model, pre, "Describe this image.", [image])
    out = llm.generate(
        {"prompt": " User: Describe this image. Assistant:", "multi_modal_data": {"image": image}},
        _params(),
        use_tqdm=False,
    )[0]
    assert list(out.prompt_token_ids) == ref_ids
    assert_same_greedy(list(out.outputs[0].token_ids), ref.tokens, ref.logprobs)


def test_images_change_the_output(setup):
    """Guards against a vacuous parity: with the image features dropped, vLLM and the
    reference would still agree on text-only behaviour."""
    llm, model, tok, pre = setup
    a, b = blocks_image(640, 480, seed=21), blocks_image(640, 480, seed=22)
    outs = llm.generate(
        [build_prompt(tok, "Describe this image.", [im]) for im in (a, b)],
        _params(max_tokens=1, logprobs=20),
        use_tqdm=False,
    )
    lp_a = {t: v.logprob for t, v in outs[0].outputs[0].logprobs[0].items()}
    lp_b = {t: v.logprob for t, v in outs[1].outputs[0].logprobs[0].items()}
    common = set(lp_a) & set(lp_b)
    diffs = [abs(lp_a[t] - lp_b[t]) for t in common]
    assert len(common) < 20 or max(diffs) > 0.05


def test_sixteen_concurrent_requests_match_one_at_a_time(setup):
    llm, model, tok, pre = setup
    sizes = [
        (336, 336),
        (640, 480),
        (480, 640),
        (1000, 750),
        (2000, 150),
        (300, 900),
        (800, 800),
        (120, 60),
    ]
    questions = [
        "Describe this image.",
        "Point to the dog.",
        "How many stars are there?",
        "What color is it?",
    ]
    prompts = [
        build_prompt(tok, questions[i % 4], [blocks_image(*sizes[i % 8], seed=100 + i)])
        for i in range(16)
    ]
    params = _params(max_tokens=8, logprobs=None)
    batched = llm.generate(prompts, params, use_tqdm=False)
    for i, prompt in enumerate(prompts):
        single = llm.generate(prompt, params, use_tqdm=False)[0]
        assert list(batched[i].outputs[0].token_ids) == list(single.outputs[0].token_ids), i


def test_wrong_placeholder_count_is_refused(setup):
    llm, model, tok, pre = setup
    images = [noise_image(336, 336, 1), noise_image(336, 336, 2)]
    prompt = build_prompt(tok, "Compare.", images)
    # Keep one <|image|> for two images.
    ids = prompt["prompt_token_ids"]
    ids.remove(tok.image_id)
    with pytest.raises(ValueError, match="placeholders"):
        llm.generate(prompt, _params(max_tokens=1), use_tqdm=False)
