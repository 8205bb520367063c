"""The fast image path: uint8 crops, normalised later on the device.

`fast_preprocess` produces what `MolmoPreprocessor.preprocess` produces (same grid, tokens,
`patch_order`, masks under the checkpoint's image-mask rule), except that `images` holds the
crops' raw uint8 RGB values [n_crops, 576, 588] instead of CLIP-normalised float32. The
consumer normalises them (`normalize_uint8`: x / 255 * (1 / std) - mean / std, the exact
path's arithmetic); in vLLM that runs on the device (molmo_vllm/model.py).

What makes it cheap, and what it changes against the exact path:

* resizing in uint8 with torch's antialiased bilinear kernel for uint8 (the filter the
  exact path runs on float32, rounded to uint8), after a box reduction by an integer factor
  (PIL's `reduce`) when the image is over 2 x REDUCING_GAP times its canvas;
* the global view (336 px) is resized from the high-res view when that is already at
  least twice its size, not from the original image;
* no float32 canvas: each view is pasted onto a black uint8 canvas (black is 0 here too,
  so padding is exactly the exact path's padding) and cut into patches with one strided copy;
* a quarter of the bytes go to the engine.

The difference to the exact path, in the normalised range (about [-1.8, 2.2]), is measured
by tests/test_fast_preprocess.py (mean |diff| <= 0.01) and benchmarks/preprocess.py.
Paired with a JPEG decoded in draft mode (server/images.py), a large photo is never
decoded or resized at full resolution.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from molmo_model.preprocessing import (
    ImageInputs,
    ImageLike,
    MolmoPreprocessor,
    ResizedView,
    fit_size,
    load_image,
)

REDUCING_GAP = 3.0  # box-reduce by k first when the image is k * 3 (k >= 2) times its canvas


def fast_preprocess(pre: MolmoPreprocessor, image: ImageLike) -> ImageInputs:
    """One image -> `ImageInputs` whose `images` are uint8 [n_crops, 576, 588] (raw RGB)."""
    cfg = pre.config
    image = load_image(image, pre.max_pixels)
    width, height = image.size
    layout = pre.image_layout(width, height)

    # Sizes come from the image as given (Ai2's rule); the pixels may come from a reduction.
    hi_shape = cfg.canvas_size(layout.rows, layout.cols)  # (H, W)
    hi_size = fit_size(height, width, *hi_shape)
    factor = int(min(height / hi_size[0], width / hi_size[1]) // REDUCING_GAP)
    if factor >= 2:
        image = image.reduce(factor)  # box filter, a fraction of a bilinear resize's cost
    pixels = _to_uint8_tensor(image)  # [1, 3, h, w], channels_last

    # High-res view first: the global view is resized from it when it is big enough.
    hi, hi_box, resized = _canvas(pixels, hi_shape, hi_size)

    size = cfg.crop_size
    glob_size = fit_size(height, width, size, size)
    if hi_size[0] >= 2 * glob_size[0] and hi_size[1] >= 2 * glob_size[1]:
        pixels = resized
    glob, glob_box, _ = _canvas(pixels, (size, size), glob_size)

    views = [ResizedView(glob, glob_box, 1, 1), ResizedView(hi, hi_box, layout.rows, layout.cols)]
    images, masks = pre.patchify(views)  # uint8 crops, as the canvases are
    return ImageInputs.of(layout, images, masks, (width, height))


def _to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 [1, 3, h, w] sharing one HWC buffer (channels_last)."""
    array = np.asarray(image)  # [h, w, 3], a read-only view of a fresh buffer
    with warnings.catch_warnings():  # torch warns about read-only arrays; nothing writes it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def _canvas(
    pixels: torch.Tensor, shape: tuple[int, int], new_size: tuple[int, int]
) -> tuple[torch.Tensor, tuple[int, int, int, int], torch.Tensor]:
    """`pixels` [1, 3, h, w] uint8 resized to `new_size` (antialiased bilinear, torch's
    uint8 kernel) and centred on a black uint8 canvas [H, W, 3]; returns the canvas,
    (top, left, new_h, new_w) and the resized pixels [1, 3, new_h, new_w]."""
    out_h, out_w = shape
    new_h, new_w = new_size
    if tuple(pixels.shape[-2:]) != (new_h, new_w):
        pixels = F.interpolate(pixels, size=(new_h, new_w), mode="bilinear", antialias=True)
    canvas = torch.zeros(out_h, out_w, 3, dtype=torch.uint8)
    top, left = (out_h - new_h) // 2, (out_w - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = pixels[0].permute(1, 2, 0)
    return canvas, (top, left, new_h, new_w), pixels


def normalize_uint8(
    images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype
) -> torch.Tensor:
    """uint8 patches [..., 588] (pixel order (py, px, c)) -> CLIP-normalised `dtype`, with
    the exact path's arithmetic (x / 255, then * (1 / std) - mean / std, in float32)."""
    scale, shift = _scale_shift(tuple(mean), tuple(std), images.device)
    x = images.to(torch.float32).div_(255.0)
    shape = x.shape
    x = x.view(*shape[:-1], shape[-1] // 3, 3)  # [..., 196, 3]: channel last
    return torch.addcmul(shift, x, scale).view(shape).to(dtype)


@functools.lru_cache(maxsize=8)
def _scale_shift(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 / std, -mean / std) as float32 [3] on `device`, made once per device: building
    them per batch would copy from the host (and wait for the GPU) on every image batch."""
    std_t = torch.tensor(std, dtype=torch.float32, device=device)
    shift = -torch.tensor(mean, dtype=torch.float32, device=device) / std_t  # as the exact path
    return 1.0 / std_t, shift
