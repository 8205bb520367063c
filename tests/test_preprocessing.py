"""Tests of Molmo's multi-crop preprocessor, image loading and prompt format.

Run: pytest tests/test_preprocessing.py -q
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import encode_image, noise_image
from PIL import Image

from molmo_model.config import CLIP_MEAN, CLIP_STD, PreprocessConfig
from molmo_model.preprocessing import (
    ImageError,
    ImageInputs,
    MolmoPreprocessor,
    image_grid,
    image_layout,
    image_token_count,
    load_image,
    prompt_text,
)

# Each crop's own mask row (what the mask checks below measure); Ai2's rule shifts the rows.
CFG = PreprocessConfig(image_mask_rule="per_crop")
T = CFG.tokens_per_side  # 12
TPC = T * T  # pooled features per crop


@pytest.fixture(scope="module")
def pre(tok):
    return MolmoPreprocessor(CFG, tok)


def count(tokens: list[int], token_id: int) -> int:
    return sum(1 for t in tokens if t == token_id)


# ---------------------------------------------------------------------------------------
# Reference implementations written from the rules in MOLMO.md, plainly (loops, pixels).
# ---------------------------------------------------------------------------------------


def reference_grid(width: int, height: int, max_crops: int = 12) -> tuple[int, int]:
    """Least up-scaling, else least down-scaling; ties: smaller grid, then fewer rows."""
    h, w = np.float32(height - 112), np.float32(width - 112)
    options = []
    for r in range(1, max_crops + 1):
        for c in range(1, max_crops + 1):
            if r * c <= max_crops:
                with np.errstate(divide="ignore"):
                    s = min(np.float32(r * 224) / h, np.float32(c * 224) / w)
                options.append((float(s), r * c, r, c))
    up = [o for o in options if o[0] >= 1]
    if up:
        best = min(up, key=lambda o: (o[0], o[1], o[2]))
    else:
        best = min(options, key=lambda o: (-o[0], o[1], o[2]))
    return best[2], best[3]


def reference_canvas(image: Image.Image, out_h: int, out_w: int) -> tuple[torch.Tensor, np.ndarray]:
    """Resize (Ai2's rule), centre, pad with 0, CLIP-normalise: ([out_h, out_w, 3], bool mask)."""
    arr = torch.tensor(np.array(image), dtype=torch.float32) / 255  # [h, w, 3]
    h, w = arr.shape[:2]
    scale = min(np.float32(out_h) / np.float32(h), np.float32(out_w) / np.float32(w))
    nh, nw = max(1, int(np.float32(h) * scale)), max(1, int(np.float32(w) * scale))
    x = arr.permute(2, 0, 1)[None]
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True).clamp(0, 1)
    canvas = torch.zeros(out_h, out_w, 3)
    mask = np.zeros((out_h, out_w), dtype=bool)
    top, left = (out_h - nh) // 2, (out_w - nw) // 2
    canvas[top : top + nh, left : left + nw] = x[0].permute(1, 2, 0)
    mask[top : top + nh, left : left + nw] = True
    canvas = (canvas - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    return canvas, mask


def patch_mean(mask: np.ndarray) -> np.ndarray:
    """[H, W] bool -> [H/14, W/14] fraction of True pixels per 14x14 patch."""
    h, w = mask.shape
    return mask.reshape(h // 14, 14, w // 14, 14).astype(np.float32).mean(axis=(1, 3))


def reassemble(inputs: ImageInputs, grid_h: int, grid_w: int) -> torch.Tensor:
    """Follow patch_order from the high-res <im_patch> tokens back to crop pixels and lay the
    2x2-patch blocks out in token order: [grid_h*28, grid_w*28, 3]."""
    n = inputs.n_crops
    px = inputs.images.view(n, T, 2, T, 2, 14, 14, 3)  # crop, pooled row, sub-row, pooled col, ...
    blocks = px.permute(0, 1, 3, 2, 5, 4, 6, 7).reshape(n * TPC, 28, 28, 3)  # per pooled feature
    high = blocks[inputs.patch_order[TPC:]].view(grid_h, grid_w, 28, 28, 3)
    return high.permute(0, 2, 1, 3, 4).reshape(grid_h * 28, grid_w * 28, 3)


# ---------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, grid, n_crops, n_tokens, n_patch",
    [
        ((336, 336), (1, 1), 2, 316, 288),
        ((640, 480), (2, 3), 7, 740, 704),
        ((480, 640), (3, 2), 7, 748, None),
    ],
)
def test_molmo_md_examples(pre, tok, size, grid, n_crops, n_tokens, n_patch):
    width, height = size
    assert image_grid(width, height) == grid
    assert image_token_count(width, height) == n_tokens
    inputs = pre.preprocess(noise_image(width, height))
    assert (inputs.rows, inputs.cols) == grid
    assert inputs.n_crops == n_crops
    assert inputs.images.shape == (n_crops, 576, 588)
    assert inputs.image_masks.shape == (n_crops, 576)
    assert len(inputs.tokens) == n_tokens
    if n_patch is not None:
        assert count(inputs.tokens, tok.im_patch_id) == n_patch


@pytest.mark.parametrize(
    "size, grid",
    [((50, 800), (1, 1)), ((1, 1), (1, 1)), ((10, 10), (1, 1)), ((112, 112), (1, 1))],
)
def test_small_sides_land_on_small_grids(size, grid):
    assert image_grid(*size) == grid


def test_grid_matches_the_rule_over_a_sweep():
    sizes = [(w, h) for w in range(1, 3000, 97) for h in range(1, 3000, 89)]
    sizes += [(2000, 150), (150, 2000), (50, 800), (4000, 3000), (112, 500), (113, 113)]
    for max_crops in (1, 4, 6, 12):
        for w, h in sizes:
            got = image_grid(w, h, max_crops)
            assert got == reference_grid(w, h, max_crops), (w, h, max_crops)
            assert got[0] * got[1] <= max_crops


def test_layout_invariants_over_a_sweep(tok):
    for max_crops in (1, 2, 5, 12):
        cfg = PreprocessConfig(max_crops=max_crops)
        for w, h in [(w, h) for w in range(1, 4200, 311) for h in range(1, 4200, 277)]:
            layout = image_layout(w, h, cfg, tok)
            n_patch = count(layout.tokens, tok.im_patch_id)
            order = layout.patch_order.tolist()
            assert len(layout.tokens) == image_token_count(w, h, max_crops)
            assert n_patch == len(order) == len(set(order))
            assert count(layout.tokens, tok.im_start_id) == count(layout.tokens, tok.im_end_id) == 2
            # The global view is taken whole, in order.
            assert order[:TPC] == list(range(TPC))
            assert 0 <= min(order) and max(order) < layout.n_crops * TPC
            # Every crop contributes: a complete window of the image, nothing missing.
            assert {o // TPC for o in order} == set(range(layout.n_crops))


def test_overlap_keeps_margins_only_at_the_border(tok):
    layout = image_layout(640, 480, CFG, tok)  # 2 rows x 3 cols
    used = torch.zeros(layout.n_crops * TPC, dtype=torch.bool)
    used[layout.patch_order] = True
    used = used.view(layout.n_crops, T, T)
    kept = {c: used[c].nonzero() for c in range(1, layout.n_crops)}
    # crop (0, 0): top-left corner keeps rows 0..9, cols 0..9 (margin 2 + window 8).
    assert (kept[1].min(0).values.tolist(), kept[1].max(0).values.tolist()) == ([0, 0], [9, 9])
    # crop (0, 1): inner column keeps only the window columns 2..9.
    assert (kept[2].min(0).values.tolist(), kept[2].max(0).values.tolist()) == ([0, 2], [9, 9])
    # crop (1, 2): bottom-right keeps rows 2..11, cols 2..11.
    assert (kept[6].min(0).values.tolist(), kept[6].max(0).values.tolist()) == ([2, 2], [11, 11])


def test_odd_margins_are_rejected(tok):
    with pytest.raises(ValueError, match="overlap_margins"):
        MolmoPreprocessor(PreprocessConfig(overlap_margins=(3, 3)), tok)


# ---------------------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------------------


SIZES = [
    (1, 1), (10, 10), (336, 336), (500, 333), (640, 480), (480, 640), (2000, 150),
    (150, 2000), (50, 800), (800, 50), (113, 900), (1000, 1000), (1280, 720),
]  # fmt: skip


@pytest.mark.parametrize("size", SIZES)
def test_preprocess_agrees_with_geometry_and_reassembles_the_image(pre, tok, size):
    width, height = size
    image = noise_image(width, height, seed=width * 7 + height)
    inputs = pre.preprocess(image)
    rows, cols = image_grid(width, height)
    assert (inputs.rows, inputs.cols, inputs.width, inputs.height) == (rows, cols, width, height)
    assert inputs.n_crops == 1 + rows * cols
    assert inputs.images.shape == (1 + rows * cols, 576, 588)
    assert inputs.images.dtype == torch.float32 and inputs.image_masks.dtype == torch.float32
    assert inputs.patch_order.dtype == torch.int64
    assert len(inputs.tokens) == image_token_count(width, height)
    assert count(inputs.tokens, tok.im_patch_id) == len(inputs.patch_order)
    assert len(set(inputs.patch_order.tolist())) == len(inputs.patch_order)

    # Global view: crop 0 is the whole image resized and padded into 336x336.
    canvas, mask = reference_canvas(image, 336, 336)
    glob = inputs.images[0].view(24, 24, 14, 14, 3).permute(0, 2, 1, 3, 4).reshape(336, 336, 3)
    torch.testing.assert_close(glob, canvas, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(inputs.image_masks[0].view(24, 24).numpy(), patch_mean(mask))

    # High-res: following patch_order from the tokens rebuilds the resized, padded image.
    grid_h, grid_w = rows * 8 + 4, cols * 8 + 4
    canvas, mask = reference_canvas(image, grid_h * 28, grid_w * 28)
    torch.testing.assert_close(reassemble(inputs, grid_h, grid_w), canvas, atol=1e-5, rtol=0)
    # Masks of each crop: fraction of image pixels per patch, from the pixel-level mask.
    pm = patch_mean(mask)  # [grid_h*2, grid_w*2] patches of the high-res canvas
    for i in range(rows):
        for j in range(cols):
            want = pm[i * 16 : i * 16 + 24, j * 16 : j * 16 + 24]
            got = inputs.image_masks[1 + i * cols + j].view(24, 24).numpy()
            np.testing.assert_array_equal(got, want)


def test_masks_padding_image_and_partial(pre):
    # 500x333 -> global view 336x223 centred at row 56: patch rows 0-3 padding, 4-18 image,
    # row 19 holds 13 image rows of 14, rows 20-23 padding.
    m = pre.preprocess(noise_image(500, 333)).image_masks[0].view(24, 24)
    assert (m[:4] == 0).all() and (m[20:] == 0).all()
    assert (m[4:19] == 1).all()
    torch.testing.assert_close(m[19], torch.full((24,), 13 / 14))


def test_padding_is_black_before_normalisation(pre):
    inputs = pre.preprocess(noise_image(640, 100))
    pad = inputs.images[0].view(576, 196, 3)[inputs.image_masks[0] == 0]  # [n, 196, 3]
    black = -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)
    assert len(pad) > 0
    torch.testing.assert_close(pad, black.expand_as(pad))


def test_white_image_stays_in_clip_range(pre):
    # Up-scaling with bilinear filters can overshoot; Ai2 clips to [0, 1] before normalising.
    inputs = pre.preprocess(Image.new("RGB", (37, 23), (255, 255, 255)))
    white = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert (inputs.images.view(-1, 3) <= white + 1e-5).all()


@pytest.mark.parametrize("max_crops", [1, 4, 6])
def test_other_max_crops(tok, max_crops):
    cfg = PreprocessConfig(max_crops=max_crops)
    p = MolmoPreprocessor(cfg, tok)
    inputs = p.preprocess(noise_image(1500, 1000))
    assert inputs.rows * inputs.cols <= max_crops
    assert (inputs.rows, inputs.cols) == image_grid(1500, 1000, max_crops)
    assert len(inputs.tokens) == image_token_count(1500, 1000, max_crops)
    assert len(inputs.tokens) == p.image_token_count(1500, 1000)


def test_over_max_crops_large_photo(pre):
    inputs = pre.preprocess(Image.new("RGB", (4000, 3000), (120, 30, 200)))
    assert (inputs.rows, inputs.cols) == (3, 4)
    assert inputs.images.shape == (13, 576, 588)
    assert len(inputs.tokens) == image_token_count(4000, 3000)
    assert torch.isfinite(inputs.images).all()


def test_ai2_mask_rule_shifts_rows(tok):
    image = noise_image(640, 100)
    per_crop = MolmoPreprocessor(CFG, tok).preprocess(image)
    ai2 = MolmoPreprocessor(PreprocessConfig(), tok).preprocess(image)  # the default rule
    assert PreprocessConfig().image_mask_rule == "ai2"
    torch.testing.assert_close(ai2.image_masks[:-1], per_crop.image_masks[1:])
    assert (ai2.image_masks[-1] == -1).all()
    torch.testing.assert_close(ai2.images, per_crop.images)  # only the masks differ
    # Ai2's example: a 336x336 image has mask rows [1.0, -1.0].
    square = MolmoPreprocessor(PreprocessConfig(), tok).preprocess(noise_image(336, 336))
    assert square.image_masks[:, 0].tolist() == [1.0, -1.0]


def test_unknown_mask_rule_is_an_error():
    with pytest.raises(ValueError, match="image_mask_rule"):
        PreprocessConfig(image_mask_rule="shifted")


def test_preprocess_accepts_bytes_and_paths(pre, tmp_path):
    image = noise_image(300, 200)
    (tmp_path / "a.png").write_bytes(encode_image(image))
    a = pre.preprocess(image)
    b = pre.preprocess(encode_image(image))
    c = pre.preprocess(tmp_path / "a.png")
    torch.testing.assert_close(a.images, b.images)
    torch.testing.assert_close(a.images, c.images)


# ---------------------------------------------------------------------------------------
# load_image
# ---------------------------------------------------------------------------------------


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (60, 40), (200, 10, 10))
    image.paste((10, 10, 200), (0, 0, 30, 40))  # left half blue
    # Stored rotated: display needs 90 degrees clockwise (EXIF orientation 6).
    loaded = load_image(encode_image(image, "JPEG", orientation=6, quality=95))
    assert loaded.size == (40, 60)
    # The stored left half (blue) ends up at the top after a clockwise rotation.
    top, bottom = np.array(loaded)[5, 20], np.array(loaded)[55, 20]
    assert top[2] > 150 and bottom[0] > 150


def test_orientation_changes_the_grid(pre):
    image = noise_image(640, 480)
    inputs = pre.preprocess(encode_image(image, "JPEG", orientation=8))
    assert (inputs.width, inputs.height, inputs.rows, inputs.cols) == (480, 640, 3, 2)


def test_mode_l_p_cmyk():
    gray = Image.new("L", (4, 4), 77)
    assert load_image(gray).mode == "RGB"
    assert np.array(load_image(encode_image(gray, "PNG")))[0, 0].tolist() == [77, 77, 77]

    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30])
    assert np.array(load_image(encode_image(pal, "PNG")))[0, 0].tolist() == [10, 200, 30]

    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red
    rgb = np.array(load_image(encode_image(cmyk, "JPEG", quality=100)))[0, 0]
    assert rgb[0] > 240 and rgb[1] < 15 and rgb[2] < 15


def test_transparency_composites_on_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # transparent black
    rgba.putpixel((0, 0), (255, 0, 0, 255))  # one opaque red pixel
    rgba.putpixel((1, 0), (0, 0, 255, 128))  # half-transparent blue
    out = np.array(load_image(encode_image(rgba, "PNG")))
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[3, 3].tolist() == [255, 255, 255]
    assert abs(int(out[0, 1, 0]) - 127) <= 1 and out[0, 1, 2] == 255

    la = Image.new("LA", (2, 2), (0, 0))
    assert np.array(load_image(la))[0, 0].tolist() == [255, 255, 255]

    pal = Image.new("P", (2, 2), 0)
    pal.putpalette([0, 0, 0, 9, 9, 9])
    pal.info["transparency"] = 0
    assert np.array(load_image(encode_image(pal, "PNG")))[0, 0].tolist() == [255, 255, 255]


def test_sixteen_bit_and_float_modes_scale_not_clip():
    values = np.array([[0, 32896, 65535]], dtype=np.uint16)
    im16 = Image.fromarray(values)
    assert im16.mode == "I;16"
    for image in (im16, Image.open(io.BytesIO(encode_image(im16, "PNG")))):
        assert np.array(load_image(image))[0, :, 0].tolist() == [0, 128, 255]
    as_i = Image.fromarray(values.astype(np.int32), mode="I")
    assert np.array(load_image(as_i))[0, :, 0].tolist() == [0, 128, 255]
    as_f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert np.array(load_image(as_f))[0, :, 0].tolist() == [0, 128, 255]


def png_header(width: int, height: int) -> bytes:
    """A PNG whose valid IHDR claims width x height, followed by a few bytes of pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64)))


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"this is not an image at all" * 10, "not in a recognised image format"),
        (png_header(100_000, 100_000), "too large|over the limit"),
        (png_header(9000, 8000), "over the limit"),  # checked before decoding: no "truncated"
        (png_header(0, 10), "zero size|not in a recognised image format"),
    ],
)
def test_bad_bytes_raise_image_error(data, message):
    with pytest.raises(ImageError, match=message):
        load_image(data)


def test_truncated_and_corrupt_files_raise_image_error():
    jpeg = encode_image(noise_image(200, 200), "JPEG")
    with pytest.raises(ImageError):
        load_image(jpeg[: len(jpeg) // 2])
    png = encode_image(noise_image(64, 64), "PNG")
    with pytest.raises(ImageError):
        load_image(png[:200])
    corrupt = bytearray(png)
    corrupt[100:140] = b"\x00" * 40  # zeroed data inside IDAT: CRC/zlib failure
    with pytest.raises(ImageError):
        load_image(bytes(corrupt))


def test_other_bad_inputs(tmp_path):
    with pytest.raises(ImageError, match="zero size"):
        load_image(Image.new("RGB", (0, 0)))
    with pytest.raises(ImageError, match="over the limit"):
        load_image(noise_image(100, 100), max_pixels=5000)
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageError):
        load_image(12345)  # type: ignore[arg-type]
    assert issubclass(ImageError, ValueError)


# ---------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------


def test_prompt_text_formats():
    assert prompt_text("What is this?") == " User: What is this? Assistant:"
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ]
    assert prompt_text(chat) == " User: Be brief. q1 Assistant: a1 User: q2 Assistant:"


@pytest.mark.parametrize(
    "messages, field",
    [
        ([], "messages"),
        ([{"role": "robot", "content": "hi"}], r"messages\[0\]\.role"),
        ([{"role": "user", "content": 3}], r"messages\[0\]\.content"),
        ([{"role": "assistant", "content": "a"}], "user"),
    ],
)
def test_prompt_text_rejects_bad_messages(messages, field):
    with pytest.raises(ValueError, match=field):
        prompt_text(messages)


def test_build_prompt_layout(pre, tok):
    a, b = noise_image(336, 336), noise_image(640, 480)
    ids, inputs = pre.build_prompt([{"role": "user", "content": "Point to the dog."}], [a, b])
    assert len(inputs) == 2 and inputs[1].cols == 3
    text_ids = tok.encode(" User: Point to the dog. Assistant:")
    assert ids == [tok.bos_id] + inputs[0].tokens + inputs[1].tokens + text_ids
    assert len(ids) == 1 + 316 + 740 + len(text_ids)
    assert tok.decode(ids[-len(text_ids) :]) == " User: Point to the dog. Assistant:"
    assert count(ids, tok.im_patch_id) == len(inputs[0].patch_order) + len(inputs[1].patch_order)


def test_build_prompt_text_only(pre, tok):
    ids, inputs = pre.build_prompt("hi")
    assert inputs == []
    assert ids == [tok.bos_id] + tok.encode(" User: hi Assistant:")
