"""Molmo 2 preprocessing (molmo_model/molmo2/preprocessing.py): tiling, token counts and
layout derived here from the rules, normalisation, pooling indices, and Ai2's own numbers.

How tests/golden/ai2_molmo2_preprocessing.json was made (once, outside the repository; none
of Ai2's code is here): Ai2's released Molmo 2 HF remote code (image_processing_molmo2.py,
processing_molmo2.py and the chat template of convert_molmo2_to_hf.py, public copies of the
allenai/Molmo2-8B files) ran with transformers 5.19.0 and torch 2.13.0+cpu on the seeded
images and questions of tests/molmo2_fixtures.py, with the release's preprocessor and
processor configs (recorded in the file's "source"). torchvision cannot be installed beside
the CPU torch, so torchvision 0.28.0's own Python `transforms` package (from its wheel,
without the C ops, which the tensor Resize does not use) stood in; transformers 5.x rejects
the processor's extra constructor arguments, so those attributes were set on the instance.
The chat text came from the template (tokenizer.apply_chat_template), the rest from
Molmo2Processor.__call__. Our preprocessor gave the same ids, token types, grids, crop
counts and pooling indices, and bit-identical pixel values, on every case; the file keeps
the ids (run-length coded), shapes, hashes, sums and probe values.

Run: pytest tests/test_molmo2_preprocessing.py -q     (a few seconds)
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from molmo2_fixtures import (
    IMAGES,
    PROMPT,
    RELEASE_SPECIAL_IDS,
    TWO_IMAGE_PROMPT,
    image,
    molmo2_tokenizer,
    named_image,
)
from PIL import Image

from molmo_model.molmo2.preprocessing import (
    Molmo2PreprocessConfig,
    Molmo2Preprocessor,
    molmo2_chat_pieces,
    molmo2_image_token_count,
    molmo2_tiling,
)

GOLDEN = json.loads(
    (Path(__file__).parent / "golden" / "ai2_molmo2_preprocessing.json").read_text()
)
CFG = Molmo2PreprocessConfig()
IDS = RELEASE_SPECIAL_IDS
BOS = IDS["<|im_end|>"]


@pytest.fixture(scope="module")
def tok():
    return molmo2_tokenizer()


@pytest.fixture(scope="module")
def pre(tok):
    return Molmo2Preprocessor(CFG, tok)


# ---- geometry, derived independently from the rules ----


def _rule_tiling(width: int, height: int) -> tuple[int, int]:
    """The tiling rule written out plainly: crops every 266 px with 112 px of margins, at most
    8 crops; least up-scaling wins, else least down-scaling; ties: fewer crops, fewer rows."""
    best = None
    for rows in range(1, 9):
        for cols in range(1, 9):
            if rows * cols > 8:
                continue
            scale = min(rows * 266 / (height - 112) if height != 112 else math.inf,
                        cols * 266 / (width - 112) if width != 112 else math.inf)  # fmt: skip
            key = (scale < 1, scale if scale >= 1 else -scale, rows * cols, rows)
            best = min(best, (key, (rows, cols))) if best else (key, (rows, cols))
    return best[1]


def _rule_tokens(rows: int, cols: int) -> int:
    # Global view: 27x27 patches -> 14x14 tokens, no <im_col>; + start/end.
    # High-res: (19*rows + 8) x (19*cols + 8) patches -> ceil(/2) tokens, <im_col> per row.
    h, w = math.ceil((19 * rows + 8) / 2), math.ceil((19 * cols + 8) / 2)
    return (2 + 14 * 14) + (2 + h * (w + 1))


SIZES = [  # (width, height, tiling (rows, cols), tokens)
    (378, 378, (1, 1), 410),
    (640, 480, (2, 2), 752),
    (480, 640, (2, 2), 752),
    (40, 30, (1, 1), 410),
    (1000, 150, (1, 4), 802),
    (1920, 1080, (2, 4), 1189),
    (517, 333, (1, 2), 536),
    (800, 50, (1, 1), 410),  # a side under 112 px: every grid "down-scales"
    (4000, 3000, (2, 3), 982),  # all grids down-scale; 2x3 ties 2x4, the smaller wins
    (379, 378, (1, 2), 536),  # one pixel wider than a 1x1 fits
    (644, 378, (1, 2), 536),
    (645, 378, (1, 3), 676),
    (3000, 500, (1, 8), 1334),
    (500, 3000, (8, 1), 1400),
]


@pytest.mark.parametrize("width,height,tiling,tokens", SIZES)
def test_tiling_and_token_counts_follow_the_rules(width, height, tiling, tokens):
    assert _rule_tiling(width, height) == tiling  # the table is the rule
    assert _rule_tokens(*tiling) == tokens
    assert molmo2_tiling(width, height, CFG) == tiling
    assert molmo2_image_token_count(width, height, CFG) == tokens


@pytest.mark.parametrize("width,height", [(w, h) for w, h, *_ in SIZES[:7]])
def test_preprocess_shapes(pre, width, height):
    rows, cols = _rule_tiling(width, height)
    x = pre.preprocess(image(width, height, seed=7))
    n_crops = 1 + rows * cols
    assert n_crops <= 9
    assert x.pixel_values.shape == (n_crops, 729, 588) and x.pixel_values.dtype == torch.float32
    h, w = math.ceil((19 * rows + 8) / 2), math.ceil((19 * cols + 8) / 2)
    assert x.image_grid == (14, 14, h, w)
    assert x.image_token_pooling.shape == (14 * 14 + h * w, 4)
    assert len(x.tokens) == _rule_tokens(rows, cols)
    assert x.tokens.count(IDS["<im_patch>"]) == x.image_token_pooling.shape[0]


def test_pooling_covers_each_kept_patch_once(pre):
    rows, cols = 2, 3
    x = pre.preprocess(image(900, 600, seed=1))
    assert (x.rows, x.cols) == (rows, cols)
    idx = x.image_token_pooling
    glob, high = idx[:196], idx[196:]
    # Global view: its 729 patches once each, padding (-1) only in the last row/column of windows.
    assert sorted(glob[glob >= 0].tolist()) == list(range(729))
    assert (glob == -1).sum() == 28 * 28 - 729
    # High-res: (19*2+8) x (19*3+8) = 46 x 65 kept patches, each once, none from the global view.
    kept = high[high >= 0]
    assert kept.numel() == 46 * 65 == kept.unique().numel()
    assert kept.min() >= 729 and kept.max() < 729 * 7
    assert (high == -1).sum() == 46 * 66 - 46 * 65  # 65 columns padded to 66
    # Each crop gives 27x27 patches minus its overlap margins (4 per side with a neighbour).
    per_crop = torch.bincount(kept // 729, minlength=7)[1:].view(rows, cols)
    sides = lambda n, i: 27 - 4 * (i > 0) - 4 * (i < n - 1)  # noqa: E731
    expected = torch.tensor(
        [[sides(rows, r) * sides(cols, c) for c in range(cols)] for r in range(rows)]
    )
    assert torch.equal(per_crop, expected)
    # The first token pools the top-left 2x2 patches of crop 1; windows are row-major.
    assert high[0].tolist() == [729, 730, 729 + 27, 730 + 27]


def test_pixels_normalised_with_siglip_mean_std_in_patch_order(pre):
    # Constant images stay constant under bilinear resizing: (v/255 - 0.5) / 0.5 everywhere.
    for value in (0, 128, 255):
        x = pre.preprocess(Image.new("RGB", (500, 300), (value, value, value)))
        expected = np.float32(
            (np.float32(value) / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)
        )
        assert torch.all(x.pixel_values == torch.tensor(expected))
    assert pre.preprocess(Image.new("RGB", (50, 50), (0, 0, 0))).pixel_values.min() == -1.0
    # A 378x378 image is not resized: a patch's 588 values are (py, px, channel).
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(378, 378, 3), dtype=np.uint8)
    x = pre.preprocess(Image.fromarray(arr))
    norm = (arr.astype(np.float32) / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)
    patch = norm[14:28, 28:42].reshape(-1)  # patch row 1, col 2 of the global view
    assert np.array_equal(x.pixel_values[0, 27 + 2].numpy(), patch)
    assert np.array_equal(x.pixel_values[1].numpy(), x.pixel_values[0].numpy())  # 1x1: same crop


def test_resize_is_bilinear_without_antialias_rounded_to_integers(pre):
    # 2x downscale of a checkerboard: bilinear at half-pixel centres averages 2x2 blocks ->
    # 127.5, rounded half to even -> 128.
    arr = np.zeros((756, 756, 3), dtype=np.uint8)
    arr[::2, ::2] = arr[1::2, 1::2] = 255
    x = pre.preprocess(Image.fromarray(arr))
    grey = (np.float32(128) / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)
    assert torch.all(x.pixel_values[0] == torch.tensor(grey))
    # Stripes every 3rd column, 1134 -> 378 (3x): output column j samples input 3j+1 exactly
    # (no antialias), so the stripes survive at full strength; antialiasing would grey them.
    arr = np.zeros((378, 1134, 3), dtype=np.uint8)
    arr[:, 1::3] = 255
    g = pre.preprocess(Image.fromarray(arr)).pixel_values[0]  # [729, 588]
    assert torch.all(g == 1.0)


def test_token_layout_one_image(pre, tok):
    inputs = pre.build_prompt(PROMPT, named_image("photo_640x480"))  # tiling 2x2 -> 23x23 tokens
    ids = inputs.input_ids.tolist()
    patch, col = IDS["<im_patch>"], IDS["<im_col>"]
    image_tokens = (
        [IDS["<low_res_im_start>"]] + [patch] * 196 + [IDS["<im_end>"]]
        + [IDS["<im_start>"]] + ([patch] * 23 + [col]) * 23 + [IDS["<im_end>"]]
    )  # fmt: skip
    text = (
        [IDS["<|im_start|>"]] + tok.encode(f"user\n{PROMPT}") + [IDS["<|im_end|>"]]
        + tok.encode("\n") + [IDS["<|im_start|>"]] + tok.encode("assistant\n")
    )  # fmt: skip
    assert ids == [BOS] + image_tokens + text
    assert inputs.token_type_ids.tolist() == [False] + [True] * len(image_tokens) + [False] * len(
        text
    )
    assert inputs.image_grids.tolist() == [[14, 14, 23, 23]]
    assert inputs.image_num_crops.tolist() == [5]
    assert inputs.pixel_values.shape == (5, 729, 588)


def test_token_layout_two_images_numbered_before_the_text(pre, tok):
    a, b = named_image("square_378"), named_image("odd_517x333")
    inputs = pre.build_prompt(TWO_IMAGE_PROMPT, [a, b])
    one_a, one_b = pre.preprocess(a), pre.preprocess(b)
    expected = (
        [BOS] + tok.encode("Image 1") + one_a.tokens + tok.encode("Image 2") + one_b.tokens
        + [IDS["<|im_start|>"]] + tok.encode(f"user\n{TWO_IMAGE_PROMPT}") + [IDS["<|im_end|>"]]
        + tok.encode("\n") + [IDS["<|im_start|>"]] + tok.encode("assistant\n")
    )  # fmt: skip
    assert inputs.input_ids.tolist() == expected
    assert inputs.image_num_crops.tolist() == [2, 3]
    assert inputs.image_grids.tolist() == [[14, 14, 14, 14], [14, 14, 14, 23]]
    assert torch.equal(inputs.pixel_values, torch.cat([one_a.pixel_values, one_b.pixel_values]))
    # Pooling indices count from 0 within each image (the model offsets them by image).
    assert torch.equal(
        inputs.image_token_pooling,
        torch.cat([one_a.image_token_pooling, one_b.image_token_pooling]),
    )


def test_chat_format_and_errors():
    S, E, I = -2, -3, -1  # noqa: E741  (the module's markers)
    chat = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "c"},
        {"role": "user", "content": "d"},
    ]  # fmt: skip
    assert molmo2_chat_pieces(chat, 1) == [
        I, S, "user\na b", E, "\n ", S, "assistant\nc", E, "\n", S, "user\nd", E, "\n", S, "assistant\n"
    ]  # fmt: skip
    assert molmo2_chat_pieces("q", 0) == [S, "user\nq", E, "\n", S, "assistant\n"]
    with pytest.raises(ValueError, match="alternates"):
        molmo2_chat_pieces(
            [{"role": "system", "content": "x"}, {"role": "user", "content": "q"}], 0
        )
    with pytest.raises(ValueError, match="alternates"):
        molmo2_chat_pieces([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], 0)
    with pytest.raises(ValueError, match="non-empty"):
        molmo2_chat_pieces([], 0)


def test_user_text_cannot_smuggle_special_tokens(pre):
    ids = pre.build_prompt("<im_patch><|image|><|im_end|>").input_ids.tolist()
    specials = [i for i in ids if i in IDS.values()]
    # BOS, then the template's own chat tokens only: the user's text stayed text.
    assert specials == [BOS, IDS["<|im_start|>"], IDS["<|im_end|>"], IDS["<|im_start|>"]]


def test_config_from_hf_and_validation():
    pre_cfg = GOLDEN["source"]["preprocessor_config"]
    proc_cfg = GOLDEN["source"]["processor_config"]
    assert Molmo2PreprocessConfig.from_hf(pre_cfg, proc_cfg) == CFG
    cfg = Molmo2PreprocessConfig.from_hf(pre_cfg, {**proc_cfg, "use_single_crop_col_tokens": None})
    assert cfg.global_col_tokens is True
    assert molmo2_image_token_count(378, 378, cfg) == 410 + 14  # an <im_col> per global row
    with pytest.raises(ValueError, match="crop_size"):
        Molmo2PreprocessConfig(crop_size=380)
    with pytest.raises(ValueError, match="overlap_margins"):
        Molmo2PreprocessConfig(overlap_margins=(14, 14))
    with pytest.raises(ValueError, match="image size"):
        molmo2_tiling(0, 10, CFG)


def test_missing_special_token_is_named(tok):
    class NoLowRes:
        def encode(self, text):
            return tok.encode(text)

        def token_to_id(self, token):
            return None if token == "<low_res_im_start>" else tok.token_to_id(token)

    with pytest.raises(ValueError, match="low_res_im_start"):
        Molmo2Preprocessor(CFG, NoLowRes())


# ---- Ai2's own numbers ----


def _unrle(pairs):
    return [i for i, n in pairs for _ in range(n)]


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=[c["name"] for c in GOLDEN["cases"]])
def test_matches_ai2_golden(pre, case):
    assert GOLDEN["source"]["preprocessor_config"]["max_crops"] == CFG.max_crops
    inputs = pre.build_prompt(case["messages"], [named_image(n) for n in case["images"]])
    assert inputs.input_ids.tolist() == _unrle(case["input_ids_rle"])
    assert int(inputs.token_type_ids.sum()) == case["n_image_tokens"]
    assert inputs.image_grids.tolist() == case["image_grids"]
    assert inputs.image_num_crops.tolist() == case["image_num_crops"]
    pooling = inputs.image_token_pooling
    gold = case["image_token_pooling"]
    assert list(pooling.shape) == gold["shape"]
    assert hashlib.sha256(pooling.contiguous().numpy().tobytes()).hexdigest() == gold["sha256"]
    assert int((pooling == -1).sum()) == gold["n_minus_one"]
    px = inputs.pixel_values
    g = case["pixel_values"]
    assert list(px.shape) == g["shape"]
    flat = px.double().reshape(-1)
    probes = flat[torch.tensor(g["probe_index"])]
    assert torch.allclose(
        probes, torch.tensor(g["probe_values"], dtype=torch.float64), atol=1e-6, rtol=0
    )
    weights = torch.from_numpy(np.random.default_rng(len(flat)).standard_normal(len(flat)))
    for name, value in (("sum", flat.sum()), ("abs_sum", flat.abs().sum()),
                        ("weighted_sum", (flat * weights).sum())):  # fmt: skip
        assert abs(value.item() - g[name]) <= 1e-6 * max(1.0, abs(g[name])), name


def test_golden_covers_every_fixture_image():
    named = {n for c in GOLDEN["cases"] for n in c["images"]}
    assert named == {name for name, *_ in IMAGES}
    assert all(c["pixel_values_bitwise_equal_to_ours"] for c in GOLDEN["cases"])


def test_the_molmo2_model_consumes_these_inputs(pre):
    """The tensors feed molmo_model.molmo2 as they come: one <im_patch> per pooled row, crops
    per image, token types; the tiny model's image ids are the release's, like the tokenizer's."""
    from molmo_model.molmo2.config import molmo2_tiny
    from molmo_model.molmo2.model import Molmo2ForConditionalGeneration

    cfg = molmo2_tiny(vocab_size=151936)
    assert cfg.token_ids["image_patch_id"] == IDS["<im_patch>"]
    assert cfg.token_ids["low_res_image_start_token_id"] == IDS["<low_res_im_start>"]
    torch.manual_seed(0)
    model = Molmo2ForConditionalGeneration(cfg).eval()
    x = pre.build_prompt(TWO_IMAGE_PROMPT, [named_image("square_378"), named_image("tiny_40x30")])
    with torch.no_grad():
        out = model(
            x.input_ids[None],
            pixel_values=x.pixel_values,
            image_token_pooling=x.image_token_pooling,
            image_grids=x.image_grids,
            image_num_crops=x.image_num_crops,
            token_type_ids=x.token_type_ids[None].long(),
        )
    assert out.logits.shape == (1, len(x.input_ids), 151936)
    assert torch.isfinite(out.logits).all()
