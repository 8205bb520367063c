"""Molmo 2 through vLLM (molmo_vllm/molmo2_model.py) against our PyTorch reference
(molmo_model.molmo2): a `molmo init --preset molmo2-tiny` checkpoint, float32, greedy, one
engine (vllm.LLM, eager) for the module.

The prompt is built once by the one prompt builder (molmo_vllm.prompt.build_prompt); the
reference gets the same chat through Molmo2Preprocessor.build_prompt, and the test checks
that vLLM's expanded prompt ids are the reference's. Then, for one image and for two images
in one prompt: the greedy tokens are equal and the first token's top-5 log-probs agree
within LOGPROB_ATOL, against the reference in its default mode, Ai2's: image tokens attend to each
other both ways during prefill (token_type_ids), which our vLLM model reproduces on vLLM's
causal CPU attention (molmo2_model.py: image rows recomputed under Ai2's mask). The causal
reference's distance is printed (`-s` shows it) and must be far larger than vLLM's.
A 4-frame video (vLLM's "video" modality, `(frames, {"fps": 2})`) is checked the same way:
its frame tokens are image tokens of Ai2's mask, its timestamps text.

~50 s on 2 CPU cores (engine start ~35 s).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from molmo_model.checkpoint import init_checkpoint, load_checkpoint
from molmo_model.molmo2.model import generate
from molmo_model.molmo2.preprocessing import Molmo2PreprocessConfig, Molmo2Preprocessor

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")

QUESTION = "Describe this image."
MAX_TOKENS = 6
TOP = 5
# The vision tower runs on vLLM's CPU GEMM in the engine (molmo_vllm/engine_gemm.py), F.linear
# in the reference: float32 rounding in another order, which this checkpoint's std-0.3 weights
# amplify (2.2e-4 on two images, 5.7e-5 on one; 5e-6 with F.linear in both). The causal
# reference is 0.012-0.017 away, so the check still tells the two masks apart.
LOGPROB_ATOL = 5e-4


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def drawn_video(frames: int = 4, width: int = 320, height: int = 240) -> np.ndarray:
    """uint8 [T, H, W, 3]: a red square moving right over noise."""
    rng = np.random.default_rng(3)
    video = np.repeat(rng.integers(0, 256, (1, height, width, 3), dtype=np.uint8), frames, axis=0)
    for t in range(frames):
        x = 20 + 60 * t
        video[t, 80:160, x : x + 80] = (255, 0, 0)
    return video


VIDEO_FPS = 2.0  # 4 frames at 2 fps: Molmo 2 samples all four (timestamps 0.0 .. 1.5)
CASES = {  # name -> images (or the video); 640x480 tiles 2x2, 300x200 1x1
    "one_image": [noise_image(640, 480, 1)],
    "two_images": [noise_image(640, 480, 1), noise_image(300, 200, 2)],
    "video": drawn_video(),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # std 0.3: logits far enough apart that greedy choices are not near-ties.
    return init_checkpoint("molmo2-tiny", tmp_path_factory.mktemp("m2") / "ckpt", seed=0, std=0.3)


@pytest.fixture(scope="module")
def reference(checkpoint):
    torch.set_num_threads(1)
    model, _, tokenizer = load_checkpoint(checkpoint)
    return model.eval(), tokenizer


def engine_gemm_layer_count(model) -> int:
    """(In the engine process) the vision side's layers that run on vLLM's CPU GEMM."""
    return sum(hasattr(layer, "cpu_linear") for layer in model.model.vision_backbone.modules())


@pytest.fixture(scope="module")
def engine_outputs(checkpoint, reference):
    """vLLM's outputs for every case, from one engine that is shut down afterwards."""
    from molmo_vllm import register
    from molmo_vllm.prompt import build_prompt

    register()
    _, tokenizer = reference
    # apply_model ships a function to the engine process (the count of engine-GEMM layers).
    mp = pytest.MonkeyPatch()
    mp.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    llm = vllm.LLM(model=str(checkpoint), dtype="float32", enforce_eager=True, seed=0,
                   max_model_len=2048, max_num_seqs=2,
                   limit_mm_per_prompt={"image": 2, "video": 1})  # fmt: skip
    params = vllm.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=TOP)
    prompts = [
        build_prompt(tokenizer, QUESTION, video=(media, {"fps": VIDEO_FPS}))
        if isinstance(media, np.ndarray)
        else build_prompt(tokenizer, QUESTION, media)
        for media in CASES.values()
    ]
    outs = llm.generate(prompts, params, use_tqdm=False)
    engine_gemm_layers = llm.apply_model(engine_gemm_layer_count)[0]
    del llm
    mp.undo()
    return {**dict(zip(CASES, outs, strict=True)), "engine_gemm_layers": engine_gemm_layers}


def reference_run(reference, media, bidirectional: bool):
    model, tokenizer = reference
    pre = Molmo2Preprocessor(Molmo2PreprocessConfig(), tokenizer)
    if isinstance(media, np.ndarray):
        inputs = pre.build_prompt(QUESTION, video=pre.preprocess_video(media, VIDEO_FPS))
    else:
        inputs = pre.build_prompt(QUESTION, media)
    mm = inputs.model_inputs()
    del mm["input_ids"], mm["token_type_ids"]
    extra = {"token_type_ids": inputs.token_type_ids[None]} if bidirectional else {}
    result = generate(
        model, inputs.input_ids, max_new_tokens=MAX_TOKENS, eos_id=tokenizer.eos_id,
        return_logprobs=True, **mm, **extra,
    )  # fmt: skip
    return inputs, result


@pytest.mark.parametrize("case", list(CASES))
def test_vllm_matches_reference(case, reference, engine_outputs):
    images = CASES[case]
    inputs, ref = reference_run(reference, images, bidirectional=True)
    out = engine_outputs[case]
    assert out.prompt_token_ids == inputs.input_ids.tolist()  # the same prompt, media expanded
    got = out.outputs[0]
    assert list(got.token_ids) == ref.tokens
    first = got.logprobs[0]  # {token id: Logprob}
    assert len(first) >= TOP
    ref_lp = ref.logprobs[0].reshape(-1)
    diff = max(abs(lp.logprob - float(ref_lp[t])) for t, lp in first.items())
    top_ref = ref_lp.topk(TOP).indices.tolist()
    assert top_ref[0] == got.token_ids[0] and set(top_ref) <= set(first)
    assert diff < LOGPROB_ATOL, f"{case}: first-token log-probs differ by {diff:.2e}"

    # The mask matters: the causal reference is measurably elsewhere.
    _, causal = reference_run(reference, images, bidirectional=False)
    gap = float((causal.logprobs[0].reshape(-1)[top_ref] - ref_lp[top_ref]).abs().max())
    print(f"\n{case}: vLLM vs reference (Ai2's bidirectional image prefill) {diff:.1e}; causal "
          f"reference vs it (first-token top-{TOP} log-probs) {gap:.3f}; tokens {ref.tokens} / "
          f"{causal.tokens}")  # fmt: skip
    assert gap > 10 * diff


def test_vision_tower_uses_vllms_cpu_gemm(checkpoint, engine_outputs):
    """Every plain nn.Linear of the engine's vision side runs on vLLM's CPU GEMM (packed
    weights, originals dropped), and the tower's output stays the reference's to float32
    rounding."""
    from molmo_model.molmo2.vision import Molmo2VisionBackbone
    from molmo_vllm.engine_gemm import use_engine_gemm, use_plain_gemm

    model, _, _ = load_checkpoint(checkpoint)
    tower = model.model.vision_backbone.eval()
    linears = sum(type(layer) is torch.nn.Linear for layer in tower.modules())
    assert engine_outputs["engine_gemm_layers"] == linears > 0
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 729, 588, generator=g)
    pooling = torch.randint(0, 2 * 729, (40, 4), generator=g)
    pooling[::7, 3] = -1
    with torch.inference_mode():
        want = tower(pixels, pooling)
        assert isinstance(tower, Molmo2VisionBackbone) and use_engine_gemm(tower) == linears
        got = tower(pixels, pooling)
    assert use_engine_gemm(tower) == 0  # once only
    assert tower.image_vit.transformer.resblocks[0].attention.wq.weight.numel() == 0
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) < 1e-4 * scale
    # Loading again (vLLM's load_weights) first gives every layer an empty weight of its shape.
    assert use_plain_gemm(tower) == linears and use_plain_gemm(tower) == 0
    wq = tower.image_vit.transformer.resblocks[0].attention.wq
    assert wq.weight.shape[0] == wq.bias.shape[0] and wq.weight.numel() > 0
    assert not hasattr(wq, "cpu_linear") and wq(torch.zeros(1, wq.weight.shape[1])).shape == (1, wq.bias.shape[0])


def test_image_prefill_plan_and_mask():
    """The step plan: a whole-prompt prefill with image tokens gets Ai2's mask (the
    reference's prefill_mask, image query rows); a decode gets nothing; a prefill that
    continues a sequence (chunk / cached prefix) stays causal and is counted."""
    from molmo_model.molmo2.model import Molmo2ForConditionalGeneration as Reference
    from molmo_vllm import molmo2_model as m

    img_ids = torch.tensor([7, 8])
    seq = torch.tensor([1, 7, 8, 8, 2, 7, 8, 3])  # text, image, text, image, text
    ids = torch.cat([seq, torch.tensor([5]), torch.tensor([8, 8, 4])])  # + decode + continuation
    qsl = torch.tensor([0, 8, 9, 12])
    seq_lens = torch.tensor([8, 20, 30])
    before = m.CAUSAL_FALLBACKS
    plan = m.image_prefill_plan(ids, qsl, seq_lens, img_ids)
    assert m.CAUSAL_FALLBACKS == before + 1 and len(plan) == 1
    p = plan[0]
    img = torch.isin(seq, img_ids)
    assert (p.start, p.end) == (0, 8) and p.rows.tolist() == img.nonzero().reshape(-1).tolist()
    want = Reference.prefill_mask(None, img[None].long(), 0)[0, 0]  # [S, S]
    assert torch.equal(p.mask, want[img])
    assert m.image_prefill_plan(ids[8:9], torch.tensor([0, 1]), torch.tensor([20]), img_ids) is None


def test_scheduling_hook_keeps_prompts_whole():
    from types import SimpleNamespace

    from molmo_vllm.config import Molmo2SchedulingHook

    sched = SimpleNamespace(enable_chunked_prefill=True, long_prefill_token_threshold=64,
                            max_num_batched_tokens=512, max_num_encoder_input_tokens=512,
                            encoder_cache_size=512, max_num_scheduled_tokens=None)  # fmt: skip
    cfg = SimpleNamespace(scheduler_config=sched, cache_config=SimpleNamespace(enable_prefix_caching=True),
                          model_config=SimpleNamespace(max_model_len=2048))  # fmt: skip
    Molmo2SchedulingHook.verify_and_update_config(cfg)
    assert not sched.enable_chunked_prefill and not cfg.cache_config.enable_prefix_caching
    assert sched.max_num_batched_tokens == 2048 and sched.long_prefill_token_threshold == 0


def test_video_items():
    """A video item's frames and fps: vLLM's (frames, metadata) pair, bare frames at the
    default 2 fps, frames as a list; a loader's sample (frames_indices) and non-uint8 refused."""
    from molmo_vllm.molmo2_processor import (
        DEFAULT_VIDEO_FPS,
        Molmo2DataParser,
        video_frames_and_fps,
    )

    video = drawn_video(3, 32, 24)
    # vLLM's parsing: every video reaches the processor as (frames, metadata), fps defaulted.
    for data, fps in ((video, 2.0), ((video, {"fps": 30.0}), 30.0), ([video], 2.0)):
        items = Molmo2DataParser().parse_mm_data({"video": data})["video"]
        (frames, metadata), = items.get_processor_data()["videos"]
        assert items.get_count() == 1 and metadata["fps"] == fps and frames.shape == video.shape
    frames, fps = video_frames_and_fps((video, {"fps": 30.0, "frames_indices": [0, 1, 2]}))
    assert fps == 30.0 and np.array_equal(frames, video)
    assert video_frames_and_fps(video)[1] == DEFAULT_VIDEO_FPS == 2.0
    assert np.array_equal(video_frames_and_fps([Image.fromarray(f) for f in video])[0], video)
    with pytest.raises(ValueError, match="samples a video's frames itself"):
        video_frames_and_fps((video, {"fps": 30.0, "frames_indices": [0, 10, 20]}))
    with pytest.raises(ValueError, match="uint8 frames"):
        video_frames_and_fps(video.astype(np.float32))


def test_video_prompt(reference):
    """build_prompt with a video: `<|video|>` where Ai2's template puts it, the video in
    multi_modal_data; not with images, not for Molmo (v1)."""
    from molmo_vllm.prompt import PromptError, build_prompt

    _, tokenizer = reference
    video = drawn_video(2, 32, 24)
    prompt = build_prompt(tokenizer, QUESTION, video=video)
    assert prompt["prompt_token_ids"][:2] == [tokenizer.bos_id, tokenizer.token_to_id("<|video|>")]
    assert prompt["multi_modal_data"]["video"][0] is video
    with pytest.raises(PromptError, match="images or a video"):
        build_prompt(tokenizer, QUESTION, [noise_image(32, 32, 0)], video=video)
