"""Molmo's overlapping multi-crop image preprocessor and its prompt format.

An image becomes a low-resolution global view (the whole image resized and padded to one
336x336 crop) followed by a rows x cols grid of overlapping 336 px crops cut every 224 px
from the image resized to rows*224+112 by cols*224+112. Every crop is cut into 24x24 patches
of 14x14 px; the model pools 2x2 patches into one LLM token (12x12 per crop). Crops overlap
by 4 patches on each side; in the token grid each crop contributes only the pooled patches
the overlap keeps (the left/top crop its left/top margin, the right/bottom crop its
right/bottom margin, inner crops only their 16-patch window), so the high-res tokens tile
the resized image exactly once. The geometry, tiling choice and resize follow Ai2's Molmo
preprocessing (see shared/MOLMO.md).

Two layers, so that token counts need no pixels:

* geometry: `image_grid`, `image_token_count`, `image_layout` (tokens and `patch_order`)
  work from (width, height) alone;
* pixels: `MolmoPreprocessor.preprocess` resizes, pads, normalises and patchifies with
  whole-tensor torch ops (one strided copy per view, no Python loops over pixels or patches).

Prompt format: BOS + the image tokens of every image, in order, + " User: {q} Assistant:";
multi-turn " User: q1 Assistant: a1 User: q2 Assistant:". `prompt_text` gives the text part.

Example:
    pre = MolmoPreprocessor(PreprocessConfig(), tokenizer)
    input_ids, image_inputs = pre.build_prompt("What is this?", [load_image(jpeg_bytes)])
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from molmo_model.config import PreprocessConfig
from molmo_model.image_masks import crop_masks
from molmo_model.images import DEFAULT_MAX_PIXELS, ImageError, load_image, to_rgb

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageError",
    "ImageInputs",
    "ImageLayout",
    "MolmoPreprocessor",
    "ResizedView",
    "choose_tiling",
    "image_grid",
    "image_layout",
    "image_token_count",
    "load_image",
    "overlap_owner",
    "prompt_text",
    "select_grid",
    "to_rgb",
]

ImageLike = Image.Image | bytes | str | os.PathLike


class TokenizerLike(Protocol):
    """What the preprocessor needs from `MolmoTokenizer`."""

    bos_id: int
    im_start_id: int
    im_end_id: int
    im_patch_id: int
    im_col_id: int

    def encode(self, text: str) -> list[int]: ...


# ---------------------------------------------------------------------------------------
# Geometry: no pixels
# ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _default_config(max_crops: int) -> PreprocessConfig:
    return PreprocessConfig(max_crops=max_crops)


@functools.lru_cache(maxsize=64)
def _candidate_grids(max_crops: int) -> np.ndarray:
    """All (rows, cols) with rows*cols <= max_crops, smaller grids first, then fewer rows,
    so that argmin/argmax (first hit wins) break ties the way Ai2 does."""
    grids = [
        (r, c)
        for r in range(1, max_crops + 1)
        for c in range(1, max_crops + 1)
        if r * c <= max_crops
    ]
    grids.sort(key=lambda g: (g[0] * g[1], g[0]))
    return np.array(grids, dtype=np.int32)  # [n_grids, 2]


def _check_geometry(config: PreprocessConfig) -> None:
    pool = config.pooling_size
    if any(m % pool for m in config.overlap_margins):
        raise ValueError(
            f"overlap_margins={config.overlap_margins} must be multiples of "
            f"pooling_size={pool} (the token layout keeps whole pooled patches)"
        )


def select_grid(width: int, height: int, config: PreprocessConfig) -> tuple[int, int]:
    """(rows, cols) of high-res crops for a width x height image under `config`'s geometry.

    Picks the grid needing the least up-scaling of the margin-reduced image to fill
    grid * window pixels, or, when every grid needs down-scaling, the least down-scaling.
    Like Ai2, negative margin-reduced sizes (sides under 112 px) are not clamped.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got width={width}, height={height}")
    margin_px = config.margin_px  # 112
    return choose_tiling(height - margin_px, width - margin_px, config.window_px, config.max_crops)


def choose_tiling(height: int, width: int, window_px: int, max_crops: int) -> tuple[int, int]:
    """(rows, cols) with rows*cols <= max_crops for an image of height x width px (already
    reduced by the overlap margins; may be zero or negative) tiled by `window_px` windows.

    The least up-scaling to fill grid * window_px wins; when every grid needs down-scaling,
    the least down-scaling. Ties: the smaller grid, then fewer rows. Molmo and Molmo 2 share
    this rule (Molmo: 224 px windows, 12 crops; Molmo 2: 266 px windows, 8 crops).
    """
    grids = _candidate_grids(max_crops)
    # float32 as in Ai2's code: it (rarely) changes which grid wins.
    size = np.array([height, width], dtype=np.float32)
    with np.errstate(divide="ignore"):
        scales = (grids * window_px).astype(np.float32) / size  # [n_grids, 2]
    scale = scales.min(axis=1)  # [n_grids]
    if (scale < 1).all():
        ix = int(np.argmax(scale))
    else:
        ix = int(np.argmin(np.where(scale < 1, np.float32(1e10), scale)))
    return int(grids[ix, 0]), int(grids[ix, 1])


def image_grid(width: int, height: int, max_crops: int = 12) -> tuple[int, int]:
    """(rows, cols) of high-res crops Molmo uses for a width x height image."""
    return select_grid(width, height, _default_config(max_crops))


def _pooled_grid_size(rows: int, cols: int, config: PreprocessConfig) -> tuple[int, int]:
    """Pooled-token rows and columns of the high-res grid (each crop's window, plus the
    outer margins once)."""
    pool = config.pooling_size
    margins = sum(config.overlap_margins) // pool
    window = config.tokens_per_side - margins
    return rows * window + margins, cols * window + margins


def _token_count(width: int, height: int, config: PreprocessConfig) -> int:
    rows, cols = select_grid(width, height, config)
    grid_h, grid_w = _pooled_grid_size(rows, cols, config)
    t = config.tokens_per_side
    # Each view: <im_start> + per row (patches + <im_col>) + <im_end>.
    return (2 + t * (t + 1)) + (2 + grid_h * (grid_w + 1))


def image_token_count(width: int, height: int, max_crops: int = 12) -> int:
    """Number of prompt tokens (all kinds) one width x height image takes."""
    return _token_count(width, height, _default_config(max_crops))


@dataclass
class ImageLayout:
    """The pixel-free part of one image's inputs."""

    rows: int
    cols: int
    tokens: list[int]  # this image's token ids
    patch_order: torch.Tensor  # LongTensor [n_im_patch]: pooled-feature index per <im_patch>

    @property
    def n_crops(self) -> int:
        return 1 + self.rows * self.cols


def _axis_owner(n_tiles: int, config: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """For each pooled position along one axis of the high-res grid: which crop along that
    axis supplies it and at which pooled position inside that crop."""
    pool = config.pooling_size
    lead, trail = (m // pool for m in config.overlap_margins)  # 2 pooled tokens each
    window = config.tokens_per_side - lead - trail  # 8
    return overlap_owner(n_tiles, lead, window, trail)


def overlap_owner(n_tiles: int, lead: int, window: int, trail: int) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping crops every `window` units, each `lead + window + trail` long: for each of
    the `n_tiles * window + lead + trail` positions along one axis, (crop, position inside
    that crop). Each crop keeps its window; the first also its leading margin, the last its
    trailing margin, so every position has exactly one owner."""
    g = np.arange(n_tiles * window + lead + trail)
    crop = np.clip((g - lead) // window, 0, n_tiles - 1)
    return crop, g - crop * window


def image_layout(
    width: int, height: int, config: PreprocessConfig, tokenizer: TokenizerLike
) -> ImageLayout:
    """Grid, token ids and `patch_order` for a width x height image (no pixels needed).

    Pooled features of the image are numbered crop-major: crop c (0 = global view), row r,
    col k -> c*T*T + r*T + k with T = tokens_per_side. `patch_order[i]` is the feature the
    i-th `<im_patch>` token takes.
    """
    _check_geometry(config)
    rows, cols = select_grid(width, height, config)
    t = config.tokens_per_side
    row_crop, row_pos = _axis_owner(rows, config)  # [grid_h]
    col_crop, col_pos = _axis_owner(cols, config)  # [grid_w]
    crop = 1 + row_crop[:, None] * cols + col_crop[None, :]  # [grid_h, grid_w]; +1: global first
    high_res = crop * t * t + row_pos[:, None] * t + col_pos[None, :]  # [grid_h, grid_w]
    patch_order = np.concatenate([np.arange(t * t), high_res.reshape(-1)])
    tokens = _view_tokens(t, t, tokenizer) + _view_tokens(len(row_pos), len(col_pos), tokenizer)
    return ImageLayout(rows, cols, tokens, torch.from_numpy(patch_order).long())


def _view_tokens(grid_h: int, grid_w: int, tokenizer: TokenizerLike) -> list[int]:
    row = [tokenizer.im_patch_id] * grid_w + [tokenizer.im_col_id]
    return [tokenizer.im_start_id, *(row * grid_h), tokenizer.im_end_id]


# ---------------------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------------------


@dataclass
class ImageInputs:
    """One image, ready for the vision backbone. n_crops = 1 (global view) + rows*cols."""

    images: torch.Tensor  # float32 [n_crops, 576, 588], CLIP-normalised, patch pixels (py, px, c)
    image_masks: torch.Tensor  # float32 [n_crops, 576], image fraction per patch (rows: mask rule)
    patch_order: torch.Tensor  # int64 [n_im_patch], index into pooled features [n_crops * 144]
    tokens: list[int]  # this image's prompt token ids
    width: int  # after EXIF orientation
    height: int
    rows: int
    cols: int

    @property
    def n_crops(self) -> int:
        return self.images.shape[0]

    @classmethod
    def of(
        cls, layout: ImageLayout, images: torch.Tensor, masks: torch.Tensor, size: tuple[int, int]
    ) -> ImageInputs:
        """An image's inputs from its layout, pixels, masks and (width, height)."""
        return cls(images, masks, layout.patch_order, layout.tokens, *size, layout.rows, layout.cols)


@dataclass
class ResizedView:
    """A view of the image resized and padded onto its canvas, before cropping."""

    canvas: torch.Tensor  # [rows*224+112, cols*224+112, 3]: float32 CLIP-normalised, or uint8 (fast path)
    box: tuple[int, int, int, int]  # (top, left, height, width) of the image on the canvas
    rows: int  # crops along each side cut from this canvas
    cols: int


def fit_size(h: int, w: int, out_h: int, out_w: int) -> tuple[int, int]:
    """Ai2's aspect-preserving size: float32 scale = min(H/h, W/w), int() truncation."""
    h32, w32 = np.float32(h), np.float32(w)
    scale = min(np.float32(out_h) / h32, np.float32(out_w) / w32)
    # At least 1 px: a 1-px-thin side would otherwise vanish (Ai2 fails on such images).
    return max(1, int(h32 * scale)), max(1, int(w32 * scale))


def _resize_into(
    pixels: torch.Tensor, canvas: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor
) -> tuple[int, int, int, int]:
    """Resize `pixels` [1, 3, h, w] (float, 0..1) to fit `canvas` [H, W, 3], centre it there
    normalised (x * scale + shift, i.e. (x - mean) / std), and return (top, left, new_h,
    new_w). The canvas arrives filled with `shift`, the normalised value of black, so
    padding is 0 before normalisation, as in Ai2's code."""
    out_h, out_w = canvas.shape[0], canvas.shape[1]
    h, w = pixels.shape[-2:]
    new_h, new_w = fit_size(h, w, out_h, out_w)
    if (new_h, new_w) == (h, w):
        resized = pixels[0]  # [3, h, w]
    else:
        resized = F.interpolate(pixels, size=(new_h, new_w), mode="bilinear", antialias=True)[0]
        resized = resized.clamp_(0.0, 1.0)
    top, left = (out_h - new_h) // 2, (out_w - new_w) // 2
    window = canvas[top : top + new_h, left : left + new_w]  # [new_h, new_w, 3]
    # One fused pass (CHW -> HWC and normalise): each op costs a thread sync on a busy CPU.
    torch.addcmul(shift, resized.permute(1, 2, 0), scale, out=window)
    return top, left, new_h, new_w


def _crops_to_patches(
    canvas: torch.Tensor,
    rows: int,
    cols: int,
    stride: int,
    config: PreprocessConfig,
    out: torch.Tensor,
) -> None:
    """Copy the rows x cols crops (crop_size px, every `stride` px) of `canvas` [H, W, 3] into
    `out` [rows*cols, n_patches, patch_pixels] with pixel order (py, px, c) in a patch."""
    p, n = config.patch_size, config.patches_per_side
    sh, sw, _ = canvas.stride()
    # [rows, cols, patch_row, patch_col, py, px*c]: one view, one copy.
    view = canvas.as_strided(
        (rows, cols, n, n, p, p * 3),
        (stride * sh, stride * sw, p * sh, p * sw, sh, 1),
    )
    out.view(rows, cols, n, n, p, p * 3).copy_(view)


def _patch_coverage(
    n_tiles: int, stride: int, start: int, length: int, config: PreprocessConfig
) -> torch.Tensor:
    """[n_tiles, patches_per_side]: image pixels per patch along one axis, for crops every
    `stride` px of a canvas whose image occupies [start, start + length)."""
    p, n = config.patch_size, config.patches_per_side
    lo = torch.arange(n_tiles)[:, None] * stride + torch.arange(n)[None, :] * p  # [n_tiles, n]
    return (
        torch.minimum(lo + p, torch.tensor(start + length)) - torch.clamp(lo, min=start)
    ).clamp_(min=0)


def _masks(
    rows: int, cols: int, stride: int, box: tuple[int, int, int, int], config: PreprocessConfig
) -> torch.Tensor:
    """[rows*cols, n_patches] float32: the fraction of each patch's pixels that are image."""
    top, left, h, w = box
    ys = _patch_coverage(rows, stride, top, h, config)  # [rows, n]
    xs = _patch_coverage(cols, stride, left, w, config)  # [cols, n]
    counts = ys[:, None, :, None] * xs[None, :, None, :]  # [rows, cols, n, n]
    return counts.reshape(rows * cols, -1).float() / float(config.patch_size**2)


class MolmoPreprocessor:
    """Images and chat messages -> Molmo input ids, crops, masks and patch order.

    The image_masks rows follow `config.image_mask_rule` (molmo_model/image_masks.py): under
    Ai2's rule they are shifted by one crop (the global view carries the first high-res
    crop's mask, the last crop -1), under "per_crop" each crop carries its own.
    """

    def __init__(
        self,
        config: PreprocessConfig,
        tokenizer: TokenizerLike,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        _check_geometry(config)
        self.config = config
        self.tokenizer = tokenizer
        self.max_pixels = max_pixels
        mean = torch.tensor(config.image_mean, dtype=torch.float32)  # [3]
        std = torch.tensor(config.image_std, dtype=torch.float32)  # [3]
        self._scale = 1.0 / std
        self._shift = -mean / std  # also the normalised value of black padding

    # ---- geometry ----
    def image_grid(self, width: int, height: int) -> tuple[int, int]:
        return select_grid(width, height, self.config)

    def image_token_count(self, width: int, height: int) -> int:
        return _token_count(width, height, self.config)

    def image_layout(self, width: int, height: int) -> ImageLayout:
        return image_layout(width, height, self.config, self.tokenizer)

    # ---- pixels ----
    def preprocess(self, image: ImageLike) -> ImageInputs:
        """One image (PIL image, encoded bytes or a path) -> `ImageInputs`."""
        image = load_image(image, self.max_pixels)
        width, height = image.size
        layout = self.image_layout(width, height)
        pixels = self.to_tensor(image)
        views = self.resize_views(pixels, layout.rows, layout.cols)
        images, masks = self.patchify(views)
        return ImageInputs.of(layout, images, masks, (width, height))

    @staticmethod
    def to_tensor(image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> float32 [1, 3, h, w] in [0, 1] (memory stays HWC: no copy to CHW)."""
        array = np.asarray(image)  # [h, w, 3] uint8, read-only view of PIL's bytes
        # float32(x) / 255 as torchvision's convert_image_dtype; numpy avoids a copy to writable.
        scaled = np.divide(array, np.float32(255.0), dtype=np.float32)  # [h, w, 3]
        return torch.from_numpy(scaled).permute(2, 0, 1).unsqueeze(0)  # [1, 3, h, w]

    def resize_views(self, pixels: torch.Tensor, rows: int, cols: int) -> list[ResizedView]:
        """pixels [1, 3, h, w] in [0, 1] -> the global view (one crop) and the rows x cols
        high-res canvas, each resized, centred, padded and CLIP-normalised (HWC)."""
        cfg = self.config
        views = []
        for n_rows, n_cols in ((1, 1), (rows, cols)):
            # rows*224+112 by cols*224+112: exactly 336x336 for the global view.
            shape = (*cfg.canvas_size(n_rows, n_cols), 3)
            canvas = self._shift.expand(shape).contiguous()  # [H, W, 3]
            box = _resize_into(pixels, canvas, self._scale, self._shift)
            views.append(ResizedView(canvas, box, n_rows, n_cols))
        return views

    def patchify(self, views: list[ResizedView]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cut the views into overlapping crops every 224 px and those into patches:
        (images [n_crops, N, P] in the canvases' dtype, image_masks [n_crops, N]), global view
        first; the masks' rows laid out by the config's image-mask rule."""
        cfg = self.config
        stride = cfg.window_px  # 224
        n_crops = sum(v.rows * v.cols for v in views)
        images = torch.empty(n_crops, cfg.num_patches, cfg.patch_pixels, dtype=views[0].canvas.dtype)
        masks = torch.empty(n_crops, cfg.num_patches)  # [n_crops, 576]
        first = 0
        for v in views:
            n = v.rows * v.cols
            _crops_to_patches(v.canvas, v.rows, v.cols, stride, cfg, images[first : first + n])
            masks[first : first + n] = _masks(v.rows, v.cols, stride, v.box, cfg)
            first += n
        return images, crop_masks(masks, cfg.image_mask_rule)

    # ---- prompts ----
    def build_prompt(
        self,
        messages: list[dict[str, Any]] | str,
        images: list[ImageLike] | None = None,
    ) -> tuple[list[int], list[ImageInputs]]:
        """Molmo input ids for a chat and its images: BOS + image tokens + prompt text."""
        text = prompt_text(messages)
        image_inputs = [self.preprocess(image) for image in images or []]
        ids = [self.tokenizer.bos_id]
        for inputs in image_inputs:
            ids.extend(inputs.tokens)
        ids.extend(self.tokenizer.encode(text))
        return ids, image_inputs


def prompt_text(messages: list[dict[str, Any]] | str) -> str:
    """The text part of a Molmo prompt: " User: q1 Assistant: a1 User: q2 Assistant:".

    `messages` is a question string or a list of {"role", "content"} dicts with roles
    "user", "assistant" or "system". Every text is stripped; non-empty system texts (in order)
    are joined and prepended, with a space, to the first user turn. An assistant turn is " " + its text; the text ends with
    " Assistant:" after a user turn, ready for generation (or for a training target to follow).
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, list) or not messages:
        raise ValueError(
            "messages must be a non-empty list of {'role', 'content'} dicts or a string"
        )
    system: list[str] = []
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ("user", "assistant", "system"):
            raise ValueError(
                f"messages[{i}].role must be 'user', 'assistant' or 'system', got {role!r}"
            )
        if not isinstance(content, str):
            raise ValueError(
                f"messages[{i}].content must be a string, got {type(content).__name__}"
            )
        content = content.strip()  # one normal form, however a caller or a data file spaced it
        if role == "system":
            if content:  # an empty system message (common from OpenAI clients) adds nothing
                system.append(content)
        else:
            turns.append((role, content))
    if not any(role == "user" for role, _ in turns):
        raise ValueError("messages must contain at least one 'user' message")
    parts: list[str] = []
    for role, content in turns:
        if role == "user":
            if system:
                content = " ".join(t for t in [*system, content] if t)
                system = []
            parts.append(f" User: {content} Assistant:")
        else:
            parts.append(f" {content}")
    return "".join(parts)
