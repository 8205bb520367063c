"""Fidelity to Ai2's own Molmo 2 code: our preprocessing and our reference model
(molmo_model/molmo2, float32) reproduce the numbers Ai2's released code computes on a
release-layout checkpoint, for one image, two images and a video.

The checkpoint (tests/molmo2_release.py, rebuilt here from its recipe and checked tensor by
tensor against the golden's sums) has Molmo2-4B's config.json with a tiny 2-layer decoder,
the full SigLIP 2 tower (25 stored blocks) and connector, the real vocabulary size and
special-token ids; the tokenizer is byte-level with those ids. For each case both must give
the golden prompt ids, crops, pooling indices and grids (video: frames, timestamps), the
golden image features, the 12 golden greedy tokens and first-token log-probabilities within
1e-3 of the golden top 5 (and the golden top 2 of every step). The goldens see Ai2's
bidirectional attention among image tokens in the prefill and its adding of image features
to the `<im_patch>` embeddings; `test_the_goldens_see_image_attention_and_add_not_replace`
shows that plain causal attention (what vLLM 0.32's built-in molmo2 does) or replacing moves
the log-probabilities past the tolerance, by as much as Ai2's own code moves them.
`test_vllm_matches_ai2` runs the same checkpoint through vLLM with our plugin (prompts from
the server's prompt builder): Ai2's prompt ids, greedy tokens and first-token top 5, for one
and two images.

How tests/golden/ai2_molmo2.json was made (once, outside the repository; none of Ai2's code is
here): Ai2's Molmo 2 HF code (configuration, modeling, image/video processing and processing
files of github.com/allenai/molmo2 at the commit the file names) ran with transformers 5.19.0
and torch 2.13.0+cpu, one thread. Its Molmo2Processor (the release's processor settings,
video num_frames 64) built the inputs from the chat template; its
Molmo2ForConditionalGeneration (weights loaded strictly, float32, sdpa attention) decoded
12 greedy tokens through HF generate with every processor output (token_type_ids included);
the log-softmax of each step was recorded, and the first token's again with token_type_ids
dropped and with the image features replacing the `<im_patch>` embeddings. Shims, none in
Ai2's math: a torchvision stand-in whose Resize makes torchvision's tensor call (float32
bilinear, antialias off, rounded back to uint8), and adapters for transformers 5.x API
changes (the default RoPE init, the processor's optional attributes, generate's
cache_position, the mask builders' keyword names).

Ai2's resize, like ours, is torch's bilinear interpolate: upscaling (the 120x90 image) gives
a few pixel values one level apart with 2 threads than with 1 (the goldens'), so the inputs
are built with one thread here.

Run: pytest tests/test_molmo2_golden.py -q --durations=0     (the SigLIP 2 tower, 25 blocks in
float32, on 14 crops: 113 s on 2 busy cores, ~30 s a case; `-m "not slow"` leaves the video
case's model run out)
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import molmo2_release
import numpy as np
import pytest
import torch
from helpers import vllm_engine
from safetensors import safe_open

from molmo_model.checkpoint import load_checkpoint
from molmo_model.generate import generate_from_embeds
from molmo_model.model import KVCache
from molmo_model.molmo2.preprocessing import (
    Molmo2Inputs,
    Molmo2PreprocessConfig,
    Molmo2Preprocessor,
    Molmo2VideoConfig,
    molmo2_video_frame_indices,
)
from molmo_model.tokenizer import MolmoTokenizer
from molmo_model.vision import add_image_features

GOLDEN = molmo2_release.golden()
LOGPROB_ATOL = 1e-3
CASES = {  # name: (question, image names); None: the video
    "single_image": (molmo2_release.PROMPT, ["single_640x480"]),
    "two_images": (molmo2_release.TWO_IMAGE_PROMPT, ["pair_a_300x500", "pair_b_120x90"]),
    "video": (molmo2_release.VIDEO_PROMPT, None),
}
# The SigLIP 2 tower on 4 frames adds ~30 s on 2 cores.
MODEL_CASES = ["single_image", "two_images", pytest.param("video", marks=pytest.mark.slow)]


@contextlib.contextmanager
def threads(n: int):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def release(molmo2_release_path: Path):
    model, config, _ = load_checkpoint(molmo2_release_path, with_tokenizer=False)  # bf16 -> float32
    tok = MolmoTokenizer.from_dir(molmo2_release_path)
    video = Molmo2VideoConfig(num_frames=GOLDEN["video"]["processor_num_frames"])
    return model.eval(), Molmo2Preprocessor(Molmo2PreprocessConfig(), tok, video_config=video)


def build_inputs(pre: Molmo2Preprocessor, case: str) -> Molmo2Inputs:
    question, names = CASES[case]
    with threads(1):  # as the goldens were made (see the module docstring)
        if names is None:
            frames = molmo2_release.video_frames()
            video = pre.preprocess_video(frames, molmo2_release.VIDEO["fps"])
            return pre.build_prompt(question, video=video)
        return pre.build_prompt(question, [molmo2_release.image(n) for n in names])


@pytest.fixture(scope="module")
def runs(release):
    """case -> (inputs, prompt embeddings with image features, image features, generation):
    each case's vision tower runs once, shared by the tests below."""
    model, pre = release
    done = {}

    def run(case: str):
        if case not in done:
            inputs = build_inputs(pre, case)
            mm = inputs.model_inputs()
            ids, tti = mm.pop("input_ids"), mm.pop("token_type_ids")
            with torch.inference_mode():
                if case == "video":
                    feats = model.video_features(
                        mm["pixel_values_videos"], mm["video_token_pooling"], mm["video_grids"]
                    )
                else:
                    feats = model.image_features(
                        mm["pixel_values"],
                        mm["image_token_pooling"],
                        mm["image_grids"],
                        mm["image_num_crops"],
                    )
                embeds = model.model.transformer.wte(ids)
                add_image_features(embeds, ids == model.config.image_patch_id, feats)
                cache = KVCache.empty(model.config.text.num_hidden_layers)
                out = generate_from_embeds(
                    model, ids, embeds.clone(), cache, GOLDEN["new_tokens"], None, 0.0, 0, 1.0,
                    torch.Generator(), True, token_type_ids=tti,
                )  # fmt: skip
            done[case] = (inputs, embeds, feats, out)
        return done[case]

    return run


def _checksums(x: torch.Tensor, golden: dict, rel: float = 1e-12, first_atol: float = 1e-6) -> None:
    """Shape, sum and abs-sum (relative to the abs-sum) and the first values (the golden
    rounds them to 6 decimals) of a float tensor. The defaults: bit-identical values."""
    x64 = x.double()
    assert list(x.shape) == golden["shape"]
    scale = float(x64.abs().sum())
    assert abs(float(x64.sum()) - golden["sum"]) <= rel * scale
    assert abs(scale - golden["abs_sum"]) <= rel * scale
    first = x.flatten()[: len(golden["first"])].tolist()
    assert first == pytest.approx(golden["first"], abs=first_atol)


def _int_summary(x: torch.Tensor, golden: dict) -> None:
    x = x.long()
    assert list(x.shape) == golden["shape"]
    assert int(x.sum()) == golden["sum"] and int((x < 0).sum()) == golden["n_neg"]
    assert int((x.flatten() * torch.arange(1, x.numel() + 1)).sum()) == golden["weighted_sum"]
    assert x.reshape(x.shape[0], -1)[:3].tolist() == golden["first_rows"]


# ---------------------------------------------------------------- the rebuilt release


def test_rebuilt_checkpoint_is_the_one_ai2_ran(molmo2_release_path: Path):
    """Same tensor names and shapes as Ai2's model instantiates; every checked tensor (all
    but ViT blocks 1..23) has the golden's seed and sum, bit for bit."""
    with safe_open(str(molmo2_release_path / "model.safetensors"), "pt") as f:
        shapes = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
        assert shapes == {name: shape for name, shape in GOLDEN["tensors"]}
        for name, check in GOLDEN["tensor_checks"].items():
            assert molmo2_release.tensor_seed(name) == check["seed"], name
            t = f.get_tensor(name)
            assert t.dtype == torch.bfloat16
            assert float(t.double().sum()) == pytest.approx(
                check["sum_fp32_of_bf16"], rel=1e-12, abs=1e-9
            ), name
    assert molmo2_release.WEIGHT_RULES == tuple(tuple(r) for r in GOLDEN["weight_rules"])


def test_rebuilt_tokenizer_and_inputs_are_ais(molmo2_release_path: Path):
    tok = MolmoTokenizer.from_dir(molmo2_release_path)
    g = GOLDEN["tokenizer"]
    assert tok.total_size == g["len"]
    assert {t: tok.token_to_id(t) for t in g["special"]} == g["special"]
    assert tok.encode("\n ") == [198, 220]  # Qwen's byte ids
    for name, (width, height, seed) in molmo2_release.IMAGES.items():
        assert GOLDEN["images"][name] == {"width": width, "height": height, "seed": seed}
        pixels = np.asarray(molmo2_release.image(name), dtype=np.int64)
        assert int(pixels.sum()) == GOLDEN["image_pixel_sums"][name], name
    video = molmo2_release.VIDEO
    assert {k: GOLDEN["video"][k] for k in video} == video
    assert (
        int(molmo2_release.video_frames().astype(np.int64).sum())
        == GOLDEN["video"]["frame_pixel_sum"]
    )
    assert (
        GOLDEN["new_tokens"] == molmo2_release.NEW_TOKENS
        and GOLDEN["prompt"] == molmo2_release.PROMPT
    )


# ---------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("case", list(CASES))
def test_preprocessing_matches_ai2(release, case):
    _, pre = release
    golden = GOLDEN["cases"][case]
    inputs = build_inputs(pre, case)
    assert inputs.input_ids.tolist() == golden["prompt_ids"]
    assert int(inputs.token_type_ids.sum()) == golden["token_type_ids_sum"]
    if case == "video":
        _checksums(inputs.pixel_values_videos, golden["pixel_values_videos"])
        _int_summary(inputs.video_token_pooling, golden["video_token_pooling"])
        assert inputs.video_grids.tolist() == golden["video_grids_list"]
        assert inputs.video.timestamps == golden["video_timestamps"]
        assert inputs.image_num_crops.numel() == 0
    else:
        _checksums(inputs.pixel_values, golden["pixel_values"])  # bit-identical crops
        _int_summary(inputs.image_token_pooling, golden["image_token_pooling"])
        assert inputs.image_grids.tolist() == golden["image_grids_list"]
        assert inputs.image_num_crops.tolist() == golden["image_num_crops_list"]


@pytest.mark.parametrize(
    "total, fps, num_frames, want",
    [
        (4, 2.0, 64, [0, 1, 2, 3]),  # the golden video: every frame at max_fps
        (2, 30.0, 64, [0, 1]),  # at most 2 frames: all
        (10, 6.0, 128, [0, 3, 6, 9]),  # every fps/max_fps = 3rd frame, the last one added
        (9, 6.0, 128, [0, 3, 6, 8]),  # 8 is not on the stride: appended
        (7, 5.0, 128, [0, 2, 5, 6]),  # stride 2.5: 0, 2.5, 5 rounded half to even, then 6
        (1000, 30.0, 8, [0, 142, 285, 428, 570, 713, 856, 999]),  # too long: 8 evenly, truncated
    ],
)
def test_video_frame_sampling(total, fps, num_frames, want):
    """Ai2's "uniform_last_frame" rule for a decoded video (max_fps 2)."""
    got = molmo2_video_frame_indices(total, fps, Molmo2VideoConfig(num_frames=num_frames))
    assert got.tolist() == want


# ---------------------------------------------------------------- the model


@pytest.mark.parametrize("case", MODEL_CASES)
def test_reference_matches_ai2(runs, case):
    golden = GOLDEN["cases"][case]
    _, _, feats, out = runs(case)
    assert feats.shape[0] == golden["n_image_features"]
    _checksums(feats, golden["image_features"], rel=1e-7, first_atol=1e-4)
    assert out.tokens == golden["greedy_tokens"]
    worst = reference_matches_golden(out, golden)
    print(f"{case}: largest log-prob difference to Ai2's code {worst:.2e}")


@pytest.mark.parametrize("case", ["single_image", "two_images"])
def test_the_goldens_see_image_attention_and_add_not_replace(release, runs, case):
    """Dropping the bidirectional image attention (plain causal, as vLLM 0.32's built-in
    molmo2 serves) or replacing the `<im_patch>` embeddings by the image features moves the
    first-token log-probs past the tolerance, and by what Ai2's own code measured; the
    causal variant's top 5 is Ai2's causal top 5."""
    model, _ = release
    golden = GOLDEN["cases"][case]
    inputs, embeds, _, _ = runs(case)
    ids = inputs.input_ids[None]
    top5 = [i for i, _ in golden["top5_first_logprobs"]]
    want = torch.tensor([lp for _, lp in golden["top5_first_logprobs"]], dtype=torch.float64)

    def first_logprobs(e: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        with torch.inference_mode():
            logits = model(ids, inputs_embeds=e, token_type_ids=token_type_ids).logits[0, -1]
        return torch.log_softmax(logits.float(), -1).double()

    bidir = first_logprobs(embeds.clone(), inputs.token_type_ids[None])
    assert float((bidir[top5] - want).abs().max()) < LOGPROB_ATOL

    causal = first_logprobs(embeds.clone(), None)
    moved = float((causal[top5] - bidir[top5]).abs().max())
    assert moved > 10 * LOGPROB_ATOL
    assert moved == pytest.approx(
        golden["causal_only_max_abs_diff_on_golden_top5"], abs=LOGPROB_ATOL
    )
    for i, lp in golden["causal_only_top5_first_logprobs"]:
        assert abs(float(causal[i]) - lp) < LOGPROB_ATOL, i

    patch = ids == model.config.image_patch_id
    replaced = embeds.clone()
    replaced[patch] -= model.model.transformer.wte(torch.tensor([model.config.image_patch_id]))[0]
    moved = float(
        (first_logprobs(replaced, inputs.token_type_ids[None])[top5] - bidir[top5]).abs().max()
    )
    assert moved > 100 * LOGPROB_ATOL
    assert moved == pytest.approx(
        golden["replace_not_add_max_abs_diff_on_golden_top5"], abs=LOGPROB_ATOL
    )


# ---------------------------------------------------------------- through vLLM


@pytest.mark.vllm
def test_vllm_matches_ai2(molmo2_release_path: Path):
    """Our vLLM model (with its bidirectional image prefill) on the same checkpoint, prompts
    from the server's prompt builder: Ai2's prompt ids, its 12 greedy tokens and its first
    token's top 5 within 1e-3, for one image, two images in one prompt and the 4-frame video
    (vLLM's "video" modality, frames with their fps)."""
    from vllm import SamplingParams

    from molmo_model.tokenizer import Molmo2Tokenizer
    from molmo_vllm.prompt import build_prompt

    tok = Molmo2Tokenizer.from_dir(molmo2_release_path)
    cases = ["single_image", "two_images", "video"]
    with threads(1):  # the images' resize, as the goldens were made
        prompts = [build_prompt(tok, CASES[c][0], [molmo2_release.image(n) for n in CASES[c][1]]) for c in cases[:2]]
    video = (molmo2_release.video_frames(), {"fps": molmo2_release.VIDEO["fps"]})
    prompts.append(build_prompt(tok, CASES["video"][0], video=video))
    params = SamplingParams(temperature=0.0, max_tokens=GOLDEN["new_tokens"], logprobs=5, ignore_eos=True)
    with vllm_engine(molmo2_release_path, max_model_len=2048, max_num_seqs=2,
                     limit_mm_per_prompt={"image": 2, "video": 1}, skip_mm_profiling=True) as llm:  # fmt: skip
        outs = llm.generate(prompts, params, use_tqdm=False)
    worst = engine_matches_golden(outs, cases, GOLDEN)
    print(f"vLLM: largest first-token log-prob difference to Ai2's code {worst:.2e}")


def engine_matches_golden(outs, cases: list[str], golden: dict) -> float:
    """vLLM's outputs for `cases` against Ai2's record: the same prompt ids and greedy tokens,
    first-token top-5 log-probs within LOGPROB_ATOL. Returns the largest difference."""
    worst = 0.0
    for case, out in zip(cases, outs, strict=True):
        want = golden["cases"][case]
        assert list(out.prompt_token_ids) == want["prompt_ids"], case
        got = out.outputs[0]
        assert list(got.token_ids) == want["greedy_tokens"], case
        first = {i: lp.logprob for i, lp in got.logprobs[0].items()}
        diffs = [abs(first[i] - lp) for i, lp in want["top5_first_logprobs"]]
        assert max(diffs) < LOGPROB_ATOL, (case, diffs)
        worst = max(worst, *diffs)
    return worst


def reference_matches_golden(out, want: dict) -> float:
    """Our reference's generation against Ai2's record: every step's golden top 5 and the
    first token's top 5 within LOGPROB_ATOL. Returns the largest difference."""
    worst = 0.0
    for step, top in zip(out.logprobs, want["generate_step_top5"], strict=True):
        for i, lp in top:
            worst = max(worst, abs(float(step[i]) - lp))
    first = [abs(float(out.logprobs[0][i]) - lp) for i, lp in want["top5_first_logprobs"]]
    assert max(first) < LOGPROB_ATOL, first
    assert worst < LOGPROB_ATOL, worst
    return max(worst, max(first))
