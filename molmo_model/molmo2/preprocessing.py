"""Molmo 2's image preprocessor and chat prompt, in plain PyTorch/NumPy.

Follows Ai2's released Molmo 2 HF processor (Molmo2-4B / Molmo2-8B: SigLIP 2 so400m/14 at
378 px); the facts are in shared/MOLMO.md, fidelity is tested against numbers Ai2's own code
produced (tests/test_molmo2_preprocessing.py, tests/golden/ai2_molmo2_preprocessing.json).

An image becomes 1 + rows*cols crops of 378x378 px, each 27x27 patches of 14x14 px:

* the global (low-res) view: the whole image stretched to 378x378 (aspect ratio NOT kept,
  no padding);
* the high-res crops: the image stretched to rows*266+112 by cols*266+112 px and cut into
  overlapping 378 px crops every 266 px (19-patch windows with 4-patch margins on each side).
  The grid is v1's rule (`choose_tiling`) with 266 px windows and at most 8 crops.

Both resizes are torchvision's tensor `Resize` as Ai2 calls it: bilinear, antialias OFF, on
the uint8 pixels cast to float32, rounded back to integers (half to even); then x/255 and
SigLIP's normalisation (x - 0.5) / 0.5, so pixels lie in [-1, 1].

The connector pools 2x2 patches into one LLM token. Pooling is not per crop: the high-res
patches that the overlap keeps (the first crop also its leading margin, the last crop its
trailing margin) form one (rows*19+8) x (cols*19+8) patch grid of the resized image; that
grid (and the global view's 27x27) is padded with -1 to even sides (bottom/right for odd
sizes) and cut into 2x2 windows. `image_token_pooling[t]` lists, for token t, the 4 patch
indices (row-major in the window) into the image's crops flattened as crop*729 + patch, or
-1. Global view: 14x14 tokens; high-res: ceil(H/2) x ceil(W/2) tokens.

Token layout of one image (released processor_config.json: image_use_col_tokens=true,
use_single_crop_col_tokens=false, use_single_crop_start_token=true):

    <low_res_im_start> <im_patch> x 14*14 <im_end>
    <im_start> ( <im_patch> x w  <im_col> ) x h <im_end>

Chat format (Ai2's chat template, Qwen3 style): all images first, before any text ("<|image|>"
for one image; "Image 1<|image|>Image 2<|image|>..." for several), then
"<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n"; a later user turn starts with
"<|im_end|>\\n" (the assistant turn before it is not closed by the template), and an
assistant turn is " <|im_start|>assistant\\n{a}" (a space first, as the template writes it). BOS is
prepended: the tokenizer's bos_token, which the releases set to their EOS "<|im_end|>".

Video (Ai2's Molmo2VideoProcessor; fidelity in tests/test_molmo2_golden.py): from a decoded
video of T frames at fps, "uniform_last_frame" sampling picks every fps/max_fps-th frame (max_fps
2) plus the last, or num_frames evenly spaced frames when the video is too long for that
(`molmo2_video_frame_indices`); each frame is stretched whole to 378x378 as a global view is,
27x27 patches pooled 3x3 into 9x9 = 81 tokens (no padding), patch indices frame*729 + patch.
Timestamps are index / fps. The text replacing `<|video|>` (after any images, before the turns):
per frame k, (" " if k > 0) + f"{t:.1f} " + <frame_start> <im_patch> x 81 <frame_end>.

    pre = Molmo2Preprocessor(Molmo2PreprocessConfig(), tokenizer)
    inputs = pre.build_prompt("What is this?", image)
    inputs.input_ids, inputs.pixel_values, inputs.image_token_pooling, ...
    video = pre.preprocess_video(frames, fps)          # uint8 [T, H, W, 3]
    inputs = pre.build_prompt("What happens?", video=video)
    model(**inputs.model_inputs())
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from molmo_model.images import DEFAULT_MAX_PIXELS, load_image
from molmo_model.preprocessing import choose_tiling, overlap_owner

__all__ = [
    "Molmo2ImageInputs",
    "Molmo2ImageLayout",
    "Molmo2Inputs",
    "Molmo2PreprocessConfig",
    "Molmo2Preprocessor",
    "Molmo2TokenIds",
    "Molmo2VideoConfig",
    "Molmo2VideoInputs",
    "molmo2_chat_pieces",
    "molmo2_image_layout",
    "molmo2_image_token_count",
    "molmo2_tiling",
    "molmo2_video_frame_indices",
]

ImageLike = Image.Image | bytes | str | os.PathLike

# Special-token strings of Molmo 2's tokenizer (ids are read from the tokenizer).
IM_START, IM_END, IM_PATCH, IM_COL = "<im_start>", "<im_end>", "<im_patch>", "<im_col>"
LOW_RES_IM_START, IM_LOW = "<low_res_im_start>", "<im_low>"
FRAME_START, FRAME_END = "<frame_start>", "<frame_end>"
IMAGE_PROMPT, VIDEO_PROMPT = "<|image|>", "<|video|>"
CHAT_START, CHAT_END = "<|im_start|>", "<|im_end|>"
DEFAULT_BOS_TOKEN = CHAT_END  # Molmo2-4B/8B: bos_token = eos_token = "<|im_end|>"


@dataclass(frozen=True)
class Molmo2PreprocessConfig:
    """Image geometry and token layout; defaults are the released Molmo2-4B/8B values
    (preprocessor_config.json + processor_config.json)."""

    crop_size: int = 378  # px, the ViT's input side
    patch_size: int = 14  # px
    max_crops: int = 8  # high-res crops (the global view comes on top)
    overlap_margins: tuple[int, int] = (
        4,
        4,
    )  # patches dropped (leading, trailing) where crops overlap
    pooling_size: tuple[int, int] = (2, 2)  # (h, w) patches pooled into one LLM token
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # SigLIP
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_use_col_tokens: bool = True  # <im_col> after each high-res token row
    use_single_crop_col_tokens: bool | None = False  # same for the global view (None: as above)
    use_single_crop_start_token: bool = True  # global view opens with <low_res_im_start>

    def __post_init__(self) -> None:
        if self.crop_size <= 0 or self.patch_size <= 0 or self.crop_size % self.patch_size:
            raise ValueError(
                f"crop_size={self.crop_size} must be a positive multiple of patch_size={self.patch_size}"
            )
        if self.max_crops < 1:
            raise ValueError(f"max_crops must be >= 1, got {self.max_crops}")
        if len(self.overlap_margins) != 2 or min(self.overlap_margins) < 0:
            raise ValueError(
                f"overlap_margins must be two non-negative ints, got {self.overlap_margins}"
            )
        if self.window_patches < 1:
            raise ValueError(
                f"overlap_margins={self.overlap_margins} leave no window in a "
                f"{self.patches_per_side}-patch crop"
            )
        if len(self.pooling_size) != 2 or min(self.pooling_size) < 1:
            raise ValueError(f"pooling_size must be two positive ints, got {self.pooling_size}")
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name} must have 3 values, got {getattr(self, name)}")
        if min(self.image_std) <= 0:
            raise ValueError(f"image_std must be positive, got {self.image_std}")

    @classmethod
    def from_hf(
        cls,
        preprocessor_config: Mapping[str, Any],
        processor_config: Mapping[str, Any] | None = None,
    ) -> Molmo2PreprocessConfig:
        """From a release's preprocessor_config.json (and processor_config.json) dicts."""
        pre, proc = dict(preprocessor_config), dict(processor_config or {})
        size = pre.get("size", {"height": 378, "width": 378})
        if size.get("height") != size.get("width"):
            raise ValueError(f"size: only square crops are supported, got {size}")
        base = cls()
        return cls(
            crop_size=int(size["height"]),
            patch_size=int(pre.get("patch_size", base.patch_size)),
            max_crops=int(pre.get("max_crops", base.max_crops)),
            overlap_margins=tuple(pre.get("overlap_margins", base.overlap_margins)),
            pooling_size=tuple(pre.get("pooling_size", base.pooling_size)),
            image_mean=tuple(pre.get("image_mean", base.image_mean)),
            image_std=tuple(pre.get("image_std", base.image_std)),
            image_use_col_tokens=bool(proc.get("image_use_col_tokens", base.image_use_col_tokens)),
            use_single_crop_col_tokens=proc.get(
                "use_single_crop_col_tokens", base.use_single_crop_col_tokens
            ),
            use_single_crop_start_token=bool(
                proc.get("use_single_crop_start_token", base.use_single_crop_start_token)
            ),
        )

    # ---- derived geometry ----
    @property
    def patches_per_side(self) -> int:  # 27
        return self.crop_size // self.patch_size

    @property
    def num_patches(self) -> int:  # 729
        return self.patches_per_side**2

    @property
    def patch_pixels(self) -> int:  # 588
        return self.patch_size * self.patch_size * 3

    @property
    def window_patches(
        self,
    ) -> int:  # 19: patches a crop keeps when it has neighbours on both sides
        return self.patches_per_side - sum(self.overlap_margins)

    @property
    def window_px(self) -> int:  # 266: the crops' stride
        return self.window_patches * self.patch_size

    @property
    def margin_px(self) -> int:  # 112
        return sum(self.overlap_margins) * self.patch_size

    @property
    def global_col_tokens(self) -> bool:
        if self.use_single_crop_col_tokens is None:
            return self.image_use_col_tokens
        return self.use_single_crop_col_tokens

    def canvas_size(self, rows: int, cols: int) -> tuple[int, int]:
        """(height, width) in px the image is resized to for a rows x cols grid."""
        return rows * self.window_px + self.margin_px, cols * self.window_px + self.margin_px


@dataclass(frozen=True)
class Molmo2VideoConfig:
    """Video sampling and layout; defaults are Ai2's Molmo2VideoProcessor / Molmo2Processor
    values (video_preprocessor_config.json, processor_config.json). Frames use the image
    config's crop size, patch size and normalisation."""

    pooling_size: tuple[int, int] = (3, 3)  # 27x27 patches -> 9x9 tokens per frame
    frame_sample_mode: str = "uniform_last_frame"
    # Most frames sampled. Ai2 trained with 128; the released video_preprocessor_config.json's
    # value has not been checked here.
    num_frames: int = 128
    max_fps: float = 2.0  # frames sampled per second of video, at most
    use_col_tokens: bool = False  # <im_col> after each token row of a frame
    use_frame_special_tokens: bool = True  # <frame_start>/<frame_end> (else <im_start>/<im_end>)

    def __post_init__(self) -> None:
        if self.frame_sample_mode != "uniform_last_frame":
            raise ValueError(
                f"frame_sample_mode={self.frame_sample_mode!r}: only 'uniform_last_frame' is supported"
            )
        if self.num_frames < 1 or self.max_fps <= 0:
            raise ValueError(
                f"num_frames must be >= 1 and max_fps > 0, got {self.num_frames}, {self.max_fps}"
            )
        if len(self.pooling_size) != 2 or min(self.pooling_size) < 1:
            raise ValueError(f"pooling_size must be two positive ints, got {self.pooling_size}")

    @classmethod
    def from_hf(
        cls,
        video_preprocessor_config: Mapping[str, Any],
        processor_config: Mapping[str, Any] | None = None,
    ) -> Molmo2VideoConfig:
        """From a release's video_preprocessor_config.json (and processor_config.json) dicts."""
        pre, proc = dict(video_preprocessor_config), dict(processor_config or {})
        base = cls()
        return cls(
            pooling_size=tuple(pre.get("pooling_size", base.pooling_size)),
            frame_sample_mode=str(pre.get("frame_sample_mode", base.frame_sample_mode)),
            num_frames=int(pre.get("num_frames") or base.num_frames),
            max_fps=float(pre.get("max_fps") or base.max_fps),
            use_col_tokens=bool(proc.get("video_use_col_tokens", base.use_col_tokens)),
            use_frame_special_tokens=bool(
                proc.get("use_frame_special_tokens", base.use_frame_special_tokens)
            ),
        )


class TokenizerLike(Protocol):
    """What the preprocessor needs from a tokenizer (`MolmoTokenizer` fits)."""

    def encode(self, text: str) -> list[int]: ...  # plain text, no BOS/EOS added

    def token_to_id(self, token: str) -> int | None: ...


@dataclass(frozen=True)
class Molmo2TokenIds:
    """Ids of Molmo 2's special tokens, read from its tokenizer."""

    bos: int
    im_start: int
    im_end: int
    im_patch: int
    im_col: int
    low_res_im_start: int
    im_low: int
    frame_start: int
    frame_end: int
    image_prompt: int  # <|image|>
    chat_start: int  # <|im_start|>
    chat_end: int  # <|im_end|>

    @classmethod
    def from_tokenizer(
        cls, tokenizer: TokenizerLike, bos_token: str = DEFAULT_BOS_TOKEN
    ) -> Molmo2TokenIds:
        """`bos_token` comes from the release's tokenizer_config.json (not tokenizer.json)."""
        names = {
            "bos": bos_token,
            "im_start": IM_START,
            "im_end": IM_END,
            "im_patch": IM_PATCH,
            "im_col": IM_COL,
            "low_res_im_start": LOW_RES_IM_START,
            "im_low": IM_LOW,
            "frame_start": FRAME_START,
            "frame_end": FRAME_END,
            "image_prompt": IMAGE_PROMPT,
            "chat_start": CHAT_START,
            "chat_end": CHAT_END,
        }
        ids = {}
        for name, token in names.items():
            i = tokenizer.token_to_id(token)
            if i is None:
                raise ValueError(f"tokenizer has no {token!r} token; Molmo 2 needs it")
            ids[name] = i
        return cls(**ids)

    @property
    def image_token_ids(self) -> tuple[int, ...]:
        """The ids Ai2 marks in token_type_ids (image tokens attend to each other both ways)."""
        return (
            self.im_patch, self.im_col, self.im_start, self.low_res_im_start,
            self.frame_start, self.im_end, self.frame_end, self.im_low,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------
# Geometry: no pixels
# ---------------------------------------------------------------------------------------


def molmo2_tiling(width: int, height: int, config: Molmo2PreprocessConfig) -> tuple[int, int]:
    """(rows, cols) of high-res crops for a width x height image."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got width={width}, height={height}")
    m = config.margin_px
    return choose_tiling(height - m, width - m, config.window_px, config.max_crops)


def _pooled(n: int, pool: int) -> int:
    return -(-n // pool)


def _high_res_patch_grid(config: Molmo2PreprocessConfig, rows: int, cols: int) -> tuple[int, int]:
    """Patches per side of the stitched high-res grid: rows*19+8 by cols*19+8."""
    lead, trail = config.overlap_margins
    return rows * config.window_patches + lead + trail, cols * config.window_patches + lead + trail


def _image_grid(config: Molmo2PreprocessConfig, rows: int, cols: int) -> tuple[int, int, int, int]:
    """Ai2's image_grids row: pooled (rows, cols) of the global view, then of the high-res grid."""
    ph, pw = config.pooling_size
    n = config.patches_per_side
    hp, wp = _high_res_patch_grid(config, rows, cols)
    return _pooled(n, ph), _pooled(n, pw), _pooled(hp, ph), _pooled(wp, pw)


def _view_token_count(h: int, w: int, col_tokens: bool) -> int:
    return 2 + h * (w + int(col_tokens))  # start + rows + end


def molmo2_image_token_count(width: int, height: int, config: Molmo2PreprocessConfig) -> int:
    """Prompt tokens (all kinds) one width x height image takes."""
    lh, lw, hh, hw = _image_grid(config, *molmo2_tiling(width, height, config))
    return _view_token_count(lh, lw, config.global_col_tokens) + _view_token_count(
        hh, hw, config.image_use_col_tokens
    )


def _pool_windows(index: np.ndarray, pool_h: int, pool_w: int) -> np.ndarray:
    """[H, W] patch indices -> [ceil(H/ph) * ceil(W/pw), ph*pw]: -1-padded to whole windows
    (Ai2 puts the smaller half of the padding first), each window row-major."""
    height, width = index.shape
    out_h, out_w = _pooled(height, pool_h), _pooled(width, pool_w)
    top, left = (out_h * pool_h - height) // 2, (out_w * pool_w - width) // 2
    padded = np.full((out_h * pool_h, out_w * pool_w), -1, dtype=np.int64)
    padded[top : top + height, left : left + width] = index
    windows = padded.reshape(out_h, pool_h, out_w, pool_w).transpose(0, 2, 1, 3)  # [h, w, ph, pw]
    return windows.reshape(out_h * out_w, pool_h * pool_w)


@functools.lru_cache(maxsize=128)
def _pooling_index(config: Molmo2PreprocessConfig, rows: int, cols: int) -> np.ndarray:
    """[n_image_patch_tokens, ph*pw] int64: for each <im_patch> token (global view first),
    the patches it pools, as crop*729 + patch (crop 0 = global view), -1 for padding."""
    n = config.patches_per_side
    lead, trail = config.overlap_margins
    window = config.window_patches
    row_crop, row_pos = overlap_owner(rows, lead, window, trail)  # [Hp]
    col_crop, col_pos = overlap_owner(cols, lead, window, trail)  # [Wp]
    crop = 1 + row_crop[:, None] * cols + col_crop[None, :]  # [Hp, Wp]; +1: global view first
    high_res = crop * n * n + row_pos[:, None] * n + col_pos[None, :]  # [Hp, Wp]
    global_view = np.arange(n * n, dtype=np.int64).reshape(n, n)  # [27, 27]
    ph, pw = config.pooling_size
    index = np.concatenate([_pool_windows(global_view, ph, pw), _pool_windows(high_res, ph, pw)])
    index.setflags(write=False)  # shared by the cache
    return index


def _view_tokens(h: int, w: int, start: int, col_tokens: bool, ids: Molmo2TokenIds) -> list[int]:
    row = [ids.im_patch] * w + ([ids.im_col] if col_tokens else [])
    return [start, *(row * h), ids.im_end]


@dataclass
class Molmo2ImageLayout:
    """The pixel-free part of one image's inputs."""

    rows: int
    cols: int
    image_grid: tuple[
        int, int, int, int
    ]  # pooled (h, w) of the global view, then of the high-res grid
    tokens: list[int]  # this image's prompt token ids
    pooling: (
        torch.Tensor
    )  # int64 [n_im_patch, ph*pw]: patches pooled per <im_patch> token, -1 = none

    @property
    def n_crops(self) -> int:
        return 1 + self.rows * self.cols


def molmo2_image_layout(
    width: int, height: int, config: Molmo2PreprocessConfig, ids: Molmo2TokenIds
) -> Molmo2ImageLayout:
    """Tiling, token ids and pooling indices for a width x height image (no pixels needed)."""
    rows, cols = molmo2_tiling(width, height, config)
    grid = _image_grid(config, rows, cols)
    global_start = ids.low_res_im_start if config.use_single_crop_start_token else ids.im_start
    tokens = _view_tokens(grid[0], grid[1], global_start, config.global_col_tokens, ids)
    tokens += _view_tokens(grid[2], grid[3], ids.im_start, config.image_use_col_tokens, ids)
    pooling = torch.from_numpy(_pooling_index(config, rows, cols).copy())
    return Molmo2ImageLayout(rows, cols, grid, tokens, pooling)


def molmo2_video_frame_indices(
    total_frames: int, fps: float, config: Molmo2VideoConfig
) -> np.ndarray:
    """Which frames of a decoded video (total_frames at fps) Molmo 2 looks at, int64 [n]
    ("uniform_last_frame"): all of them when there are at most 2; when the video is longer
    than (num_frames - 1) / max_fps seconds, num_frames (at most all) evenly spaced from the
    first to the last frame, truncated to integers; otherwise every fps / max_fps frames
    (rounded half to even) from the first, with the last frame added when not already there."""
    if total_frames < 1 or fps <= 0:
        raise ValueError(f"a video needs frames and a positive fps, got {total_frames} at {fps}")
    if total_frames <= 2:
        return np.arange(total_frames, dtype=np.int64)
    n, last = config.num_frames, total_frames - 1
    if total_frames / fps > (n - 1) / config.max_fps:
        return np.linspace(0, last, num=min(n, total_frames), endpoint=True).astype(np.int64)
    steps = np.arange(0.0, last, fps / config.max_fps)  # float64, stop excluded
    if np.round(steps[-1]) != last:
        steps = np.append(steps, last)
    return np.round(steps).astype(np.int64)


# ---------------------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------------------


@dataclass
class Molmo2ImageInputs:
    """One image, ready for the vision backbone. n_crops = 1 (global view) + rows*cols."""

    pixel_values: torch.Tensor  # float32 [n_crops, 729, 588], patch pixels (py, px, c), in [-1, 1]
    image_token_pooling: (
        torch.Tensor
    )  # int64 [n_im_patch, 4], into this image's n_crops*729 patches
    image_grid: tuple[
        int, int, int, int
    ]  # (14, 14, h, w): pooled global view, pooled high-res grid
    tokens: list[int]  # this image's prompt token ids
    width: int  # after EXIF orientation
    height: int
    rows: int
    cols: int

    @property
    def n_crops(self) -> int:
        return self.pixel_values.shape[0]


@dataclass
class Molmo2VideoInputs:
    """One video's sampled frames, ready for the vision backbone."""

    pixel_values_videos: torch.Tensor  # float32 [n_frames, 729, 588], each frame's whole picture
    video_token_pooling: (
        torch.Tensor
    )  # int64 [n_frames * 81, 9], into the frames' patches (729 each)
    video_grid: tuple[int, int, int]  # (n_frames, 9, 9): frames, pooled rows, pooled cols
    timestamps: list[float]  # seconds, frame index / fps
    frame_indices: list[int]  # into the frames given
    tokens: list[int | str]  # the layout: token ids, and the "{t:.1f} " texts as strings

    @property
    def n_frames(self) -> int:
        return self.pixel_values_videos.shape[0]


@dataclass
class Molmo2Inputs:
    """A whole prompt: what Ai2's Molmo2Processor returns for one example (no batch axis)."""

    input_ids: torch.Tensor  # int64 [S]
    token_type_ids: (
        torch.Tensor
    )  # bool [S]: True at image tokens (bidirectional attention among them)
    pixel_values: torch.Tensor  # float32 [sum n_crops, 729, 588], images in prompt order
    image_token_pooling: torch.Tensor  # int64 [sum n_im_patch, 4], each image's indices from 0
    image_grids: torch.Tensor  # int64 [n_images, 4]
    image_num_crops: torch.Tensor  # int64 [n_images]
    images: list[Molmo2ImageInputs] = field(default_factory=list)
    # A video (at most one, never with images): the frames' tensors, as Ai2's processor names them.
    pixel_values_videos: torch.Tensor | None = None  # float32 [n_frames, 729, 588]
    video_token_pooling: torch.Tensor | None = None  # int64 [n_frames * 81, 9]
    video_grids: torch.Tensor | None = None  # int64 [1, 3]
    video: Molmo2VideoInputs | None = None

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The tensors Molmo2ForConditionalGeneration.forward / generate take, by name
        (input_ids and token_type_ids with a batch axis)."""
        out = {"input_ids": self.input_ids[None], "token_type_ids": self.token_type_ids[None]}
        if self.images:
            out.update(pixel_values=self.pixel_values, image_token_pooling=self.image_token_pooling,
                       image_grids=self.image_grids, image_num_crops=self.image_num_crops)  # fmt: skip
        if self.video is not None:
            out.update(pixel_values_videos=self.pixel_values_videos,
                       video_token_pooling=self.video_token_pooling, video_grids=self.video_grids)  # fmt: skip
        return out


def _resize_uint8(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [3, h, w] -> float32 [3, H, W] holding integers 0..255: torchvision's tensor
    Resize(bilinear, antialias=False) on uint8 (cast to float32, interpolate, round)."""
    x = pixels.to(torch.float32)  # keeps the HWC memory layout, as Ai2's call does
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=False)[0]
    return x.round_().clamp_(0.0, 255.0)


class Molmo2Preprocessor:
    """Images and a chat -> Molmo 2's input ids, crops, pooling indices and grids."""

    def __init__(
        self,
        config: Molmo2PreprocessConfig,
        tokenizer: TokenizerLike,
        bos_token: str = DEFAULT_BOS_TOKEN,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        video_config: Molmo2VideoConfig | None = None,
    ) -> None:
        self.config = config
        self.video_config = video_config if video_config is not None else Molmo2VideoConfig()
        self.tokenizer = tokenizer
        self.ids = Molmo2TokenIds.from_tokenizer(tokenizer, bos_token)
        self.max_pixels = max_pixels
        self._mean = torch.tensor(config.image_mean, dtype=torch.float32)  # [3]
        self._std = torch.tensor(config.image_std, dtype=torch.float32)  # [3]

    # ---- geometry ----
    def tiling(self, width: int, height: int) -> tuple[int, int]:
        return molmo2_tiling(width, height, self.config)

    def image_token_count(self, width: int, height: int) -> int:
        return molmo2_image_token_count(width, height, self.config)

    def image_layout(self, width: int, height: int) -> Molmo2ImageLayout:
        return molmo2_image_layout(width, height, self.config, self.ids)

    # ---- pixels ----
    def preprocess(self, image: ImageLike) -> Molmo2ImageInputs:
        """One image (PIL image, encoded bytes or a path) -> `Molmo2ImageInputs`."""
        image = load_image(image, self.max_pixels)
        width, height = image.size
        layout = self.image_layout(width, height)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # uint8 [3, h, w], HWC memory
        cfg = self.config
        crops = torch.empty(
            layout.n_crops, cfg.num_patches, cfg.patch_pixels
        )  # [n_crops, 729, 588]
        self._cut(pixels, (cfg.crop_size, cfg.crop_size), 1, 1, crops[:1])
        self._cut(
            pixels, cfg.canvas_size(layout.rows, layout.cols), layout.rows, layout.cols, crops[1:]
        )
        return Molmo2ImageInputs(
            crops, layout.pooling, layout.image_grid, layout.tokens, width, height,
            layout.rows, layout.cols,
        )  # fmt: skip

    def preprocess_video(
        self,
        frames: np.ndarray | torch.Tensor | Sequence[Any],
        fps: float,
        sample: bool = True,
    ) -> Molmo2VideoInputs:
        """A decoded video, frames uint8 [T, H, W, 3] (RGB) at `fps`, -> `Molmo2VideoInputs`:
        the frames `molmo2_video_frame_indices` picks (all of them with sample=False), each
        stretched whole to crop_size x crop_size as an image's global view is (no tiling),
        pooled pooling_size (3x3: 81 tokens a frame), timestamps index / fps."""
        video = (
            np.stack([np.asarray(f) for f in frames])
            if isinstance(frames, Sequence)
            else np.asarray(frames)
        )
        if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
            raise ValueError(
                f"frames must be uint8 [T, H, W, 3], got {video.dtype} {list(video.shape)}"
            )
        vcfg, cfg = self.video_config, self.config
        if sample:
            indices = molmo2_video_frame_indices(video.shape[0], fps, vcfg)
        else:
            indices = np.arange(video.shape[0], dtype=np.int64)
        n = cfg.patches_per_side
        pixel_values = torch.empty(len(indices), cfg.num_patches, cfg.patch_pixels)
        for k, i in enumerate(indices):
            pixels = torch.from_numpy(np.ascontiguousarray(video[i])).permute(2, 0, 1)  # HWC memory
            self._cut(pixels, (cfg.crop_size, cfg.crop_size), 1, 1, pixel_values[k : k + 1])
        ph, pw = vcfg.pooling_size
        one = _pool_windows(np.arange(n * n, dtype=np.int64).reshape(n, n), ph, pw)  # [81, 9]
        offsets = np.arange(len(indices), dtype=np.int64)[:, None, None] * (n * n)
        pooling = np.where(one[None] >= 0, one[None] + offsets, -1).reshape(-1, ph * pw)
        h, w = _pooled(n, ph), _pooled(n, pw)
        timestamps = [float(i) / float(fps) for i in indices]
        tokens = self.video_tokens(timestamps)
        return Molmo2VideoInputs(
            pixel_values, torch.from_numpy(pooling), (len(indices), h, w), timestamps,
            [int(i) for i in indices], tokens,
        )  # fmt: skip

    def video_tokens(self, timestamps: Sequence[float]) -> list[int | str]:
        """A video's layout from its frames' timestamps: token ids, and the "{t:.1f} " texts
        as strings (tokenized as plain text where the prompt is built)."""
        vcfg, ids, n = self.video_config, self.ids, self.config.patches_per_side
        h, w = _pooled(n, vcfg.pooling_size[0]), _pooled(n, vcfg.pooling_size[1])
        start, end = (
            (ids.frame_start, ids.frame_end)
            if vcfg.use_frame_special_tokens
            else (ids.im_start, ids.im_end)
        )
        row = [ids.im_patch] * w + ([ids.im_col] if vcfg.use_col_tokens else [])
        tokens: list[int | str] = []
        for k, t in enumerate(timestamps):
            tokens += [(" " if k else "") + f"{t:.1f} ", start, *(row * h), end]
        return tokens

    def _cut(
        self, pixels: torch.Tensor, size: tuple[int, int], rows: int, cols: int, out: torch.Tensor
    ) -> None:
        """Resize `pixels` to `size`, normalise, and write its rows x cols overlapping crops
        (crop_size px every window_px) as patches into `out` [rows*cols, 729, 588]."""
        cfg = self.config
        resized = _resize_uint8(pixels, size)  # [3, H, W]
        # Same float32 ops as Ai2: x / 255, then (x - mean) / std.
        canvas = (resized.permute(1, 2, 0) / 255.0 - self._mean) / self._std  # [H, W, 3]
        canvas = canvas.contiguous()
        p, n, stride = cfg.patch_size, cfg.patches_per_side, cfg.window_px
        sh, sw, _ = canvas.stride()
        # [rows, cols, patch_row, patch_col, py, px*c]: one strided view, one copy.
        view = canvas.as_strided(
            (rows, cols, n, n, p, p * 3), (stride * sh, stride * sw, p * sh, p * sw, sh, 1)
        )
        out.view(rows, cols, n, n, p, p * 3).copy_(view)

    # ---- prompts ----
    def build_prompt(
        self,
        messages: str | Sequence[Mapping[str, Any]],
        images: ImageLike | Sequence[ImageLike] | None = None,
        video: Molmo2VideoInputs | None = None,
    ) -> Molmo2Inputs:
        """Molmo 2 inputs for a question (or chat messages) and its images, in order, or one
        video (`preprocess_video`'s output; Ai2's processor takes images or a video, not both)."""
        if images is None:
            images = []
        elif isinstance(images, (Image.Image, bytes, str, os.PathLike)):
            images = [images]
        if video is not None and images:
            raise ValueError("Molmo 2 takes images or a video in one prompt, not both")
        image_inputs = [self.preprocess(image) for image in images]
        ids = [self.ids.bos]
        pending = iter(image_inputs)
        for piece in molmo2_chat_pieces(
            messages, len(image_inputs), num_videos=int(video is not None)
        ):
            if isinstance(piece, str):
                ids.extend(self.tokenizer.encode(piece))
            elif piece == _IMAGE:
                ids.extend(next(pending).tokens)
            elif piece == _VIDEO:
                for part in video.tokens:  # timestamps are text, the rest ids
                    ids.extend(self.tokenizer.encode(part) if isinstance(part, str) else [part])
            else:
                ids.append(self.ids.chat_start if piece == _CHAT_START else self.ids.chat_end)
        input_ids = torch.tensor(ids, dtype=torch.long)  # [S]
        token_type_ids = torch.isin(input_ids, torch.tensor(self.ids.image_token_ids))  # [S]
        cfg = self.config
        if image_inputs:
            pixel_values = torch.cat([x.pixel_values for x in image_inputs])
            pooling = torch.cat([x.image_token_pooling for x in image_inputs])
        else:
            pixel_values = torch.empty(0, cfg.num_patches, cfg.patch_pixels)
            pooling = torch.empty(0, cfg.pooling_size[0] * cfg.pooling_size[1], dtype=torch.long)
        return Molmo2Inputs(
            input_ids=input_ids,
            token_type_ids=token_type_ids,
            pixel_values=pixel_values,
            image_token_pooling=pooling,
            image_grids=torch.tensor([x.image_grid for x in image_inputs], dtype=torch.long).view(
                -1, 4
            ),
            image_num_crops=torch.tensor([x.n_crops for x in image_inputs], dtype=torch.long),
            images=image_inputs,
            pixel_values_videos=None if video is None else video.pixel_values_videos,
            video_token_pooling=None if video is None else video.video_token_pooling,
            video_grids=None
            if video is None
            else torch.tensor([video.video_grid], dtype=torch.long),
            video=video,
        )


# Markers in `molmo2_chat_pieces`' output for the pieces that are not plain text.
_IMAGE, _CHAT_START, _CHAT_END, _VIDEO = -1, -2, -3, -4


def molmo2_chat_pieces(
    messages: str | Sequence[Mapping[str, Any]], num_images: int, num_videos: int = 0
) -> list[str | int]:
    """Ai2's Molmo 2 chat template as a list of plain-text pieces and markers (`_IMAGE`,
    `_VIDEO`, `_CHAT_START`, `_CHAT_END`), so that user text is tokenized as plain text.
    Videos (`<|video|>` each) follow the images, before any turn.

    `messages`: a question string, or [{"role": "user"|"assistant", "content": str | parts}]
    alternating user/assistant from a user turn; a list of parts contributes its text parts
    joined by one space (image parts are counted by the caller: images always come first).
    The pieces end with the generation prompt after a final user turn.
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a question string or a non-empty list of messages")
    pieces: list[str | int] = []
    if num_images == 1:
        pieces.append(_IMAGE)
    else:
        for i in range(num_images):
            pieces += [f"Image {i + 1}", _IMAGE]
    pieces += [_VIDEO] * num_videos
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content'")
        role = message.get("role")
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(
                f"messages[{i}].role must be {expected!r} (Molmo 2's chat alternates user/assistant "
                f"from a user turn), got {role!r}"
            )
        text = _message_text(message.get("content"), i)
        if role == "user":
            if i > 0:
                pieces += [_CHAT_END, "\n"]
            pieces += [_CHAT_START, f"user\n{text}", _CHAT_END, "\n"]
        else:
            # The released template writes a space before an assistant turn's <|im_start|>
            # (not before the generation prompt's).
            pieces += [" ", _CHAT_START, f"assistant\n{text}"]
    if messages[-1].get("role") == "user":
        pieces += [_CHAT_START, "assistant\n"]
    # Adjacent texts are one string to the tokenizer ("\n" + " " is "\n ").
    merged: list[str | int] = []
    for piece in pieces:
        if isinstance(piece, str) and merged and isinstance(merged[-1], str):
            merged[-1] += piece
        else:
            merged.append(piece)
    return [p for p in merged if p != ""]


def _message_text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping):
                raise ValueError(f"messages[{i}].content[{j}] must be a dict with a 'type'")
            if part.get("type") == "text":
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"messages[{i}].content[{j}].text must be a string")
                texts.append(part["text"])
        return " ".join(texts)
    raise ValueError(f"messages[{i}].content must be a string or a list of parts")
