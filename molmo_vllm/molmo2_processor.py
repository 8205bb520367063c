"""vLLM's multimodal processing for Molmo 2, built on our own preprocessor
(molmo_model.molmo2.preprocessing.Molmo2Preprocessor: Ai2's image processing, pixel-exact;
no HF processor, no remote code). Molmo's v1 room is molmo_vllm/processor.py; this is its
Molmo 2 neighbour, with the same three pieces:

* `Molmo2ProcessingInfo`: the checkpoint's `Molmo2Config`, the preprocessing geometry
  (preprocessor_config.json / processor_config.json when the folder has them, else the
  release's values) and the special token ids, read from the tokenizer's vocabulary;
* `Molmo2DummyInputsBuilder`: the image vLLM profiles memory with (the most tokens);
* `Molmo2MultiModalProcessor`: `Molmo2Preprocessor.preprocess` per image, and where each
  image's tokens go.

Prompt contract: one `<|image|>` per image, the i-th replaced by the i-th image's tokens
(`<low_res_im_start>` global view `<im_end>` `<im_start>` high-res rows `<im_end>`); a prompt
with none gets every image's tokens right after BOS (`<|im_end|>`, prepended when missing).
`molmo_vllm.prompt` builds Ai2's chat layout ("Image 1<|image|>Image 2<|image|>..." first).
Only `<im_patch>` positions receive image features (added to their embeddings).

Fields handed to the model per image (images of a batch concatenated):
  pixel_values [c_i, 729, 588] float32 in [-1, 1], image_token_pooling [m_i, 4] (indices
  into the image's own c_i * 729 patches, -1 = none), image_grids [4], image_num_crops c_i,
  image_num_tokens m_i (= its `<im_patch>` count), image_size (width, height).

Video (vLLM's "video" modality, at most one per prompt, never with images, as Ai2's processor):
an item is decoded frames, uint8 [T, H, W, 3] (a numpy array, a tensor or a list of frames),
or vLLM's `(frames, metadata)` pair whose metadata["fps"] is the video's frame rate. Without
metadata (or fps) the frames are taken at DEFAULT_VIDEO_FPS = 2 frames a second, Molmo 2's
max_fps: up to num_frames (128) frames are then all kept, timestamps k / 2. The frames are
the whole decoded video: `Molmo2Preprocessor.preprocess_video(frames, fps)` samples them
(Ai2's "uniform_last_frame"); metadata["frames_indices"] that are not 0..T-1 (frames sampled
by a loader) are refused. `<|video|>` is replaced by the video's layout: per frame
"{t:.1f} " (text, tokenized as the reference does) `<frame_start>` `<im_patch>` x 81
`<frame_end>`; a prompt without `<|video|>` gets it right after BOS. Fields per video:
  pixel_values_videos [f_i, 729, 588], video_token_pooling [f_i * 81, 9] (indices into the
  video's own f_i * 729 patches), video_grids [3] = (f_i, 9, 9), video_num_frames f_i,
  video_num_tokens f_i * 81, video_timestamps [f_i] (seconds; they give the prompt's text).
Profiling uses a blank video of as many frames as fit max_model_len (at most num_frames),
at DEFAULT_VIDEO_FPS; `--limit-mm-per-prompt '{"video": 0}'` leaves video out.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import (
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptIndexTargets,
    PromptInsertion,
    PromptReplacement,
    PromptUpdate,
    PromptUpdateDetails,
)

from molmo_model.molmo2.config import Molmo2Config
from molmo_model.molmo2.preprocessing import (
    IMAGE_PROMPT,
    VIDEO_PROMPT,
    Molmo2ImageInputs,
    Molmo2Preprocessor,
    molmo2_tiling,
)
from molmo_vllm.config import molmo2_config_of, preprocess_config_of, video_config_of
from molmo_vllm.processor import MolmoDummyInputsBuilder, _to_pil

DEFAULT_VIDEO_FPS = 2.0  # a video item's frame rate when vLLM gives none (Molmo 2's max_fps)


class VocabIds:
    """A tokenizer's vocabulary as the preprocessor's `TokenizerLike`: the special token ids,
    and plain-text encoding (no special tokens) for a video's timestamps; the chat's text is
    tokenized by molmo_vllm.prompt, not here."""

    def __init__(self, vocab: Mapping[str, int], tokenizer: Any = None) -> None:
        self.vocab = vocab
        self.tokenizer = tokenizer

    def token_to_id(self, token: str) -> int | None:
        return self.vocab.get(token)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise NotImplementedError("VocabIds only carries special token ids")
        return list(self.tokenizer.encode(text, add_special_tokens=False))


class Molmo2DataParser(MultiModalDataParser):
    """vLLM's parser, handing every video on as `(frames, metadata)`: metadata is
    {"fps": DEFAULT_VIDEO_FPS} when the item has none."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(video_needs_metadata=True, **kwargs)

    def _get_video_with_metadata(self, video):  # type: ignore[override]
        frames, metadata = super()._get_video_with_metadata(video)
        return frames, metadata if metadata is not None else {"fps": DEFAULT_VIDEO_FPS}


def video_frames_and_fps(item: Any) -> tuple[np.ndarray, float]:
    """A video item (frames, or vLLM's (frames, metadata)) -> uint8 [T, H, W, 3], fps."""
    frames, metadata = item if isinstance(item, tuple) else (item, None)
    metadata = dict(metadata or {})
    if isinstance(frames, torch.Tensor):
        frames = frames.cpu().numpy()
    elif isinstance(frames, (list, tuple)):
        frames = np.stack([np.asarray(f.convert("RGB")) if hasattr(f, "convert") else np.asarray(f)
                           for f in frames])  # fmt: skip
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"a video must be uint8 frames [T, H, W, 3], got {frames.dtype} "
                         f"{list(frames.shape)}")  # fmt: skip
    indices = metadata.get("frames_indices")
    if indices is not None and list(indices) != list(range(frames.shape[0])):
        raise ValueError("Molmo 2 samples a video's frames itself: give all decoded frames "
                         "(metadata frames_indices 0..T-1), not a loader's sample")  # fmt: skip
    fps = float(metadata.get("fps") or DEFAULT_VIDEO_FPS)
    return frames, fps


def bos_token_of(tokenizer: Any) -> str:
    """Molmo 2's BOS is the tokenizer's bos_token (Ai2 sets it to `<|im_end|>`)."""
    return getattr(tokenizer, "bos_token", None) or "<|im_end|>"


class Molmo2ProcessingInfo(BaseProcessingInfo):
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        # any number of images (`limit_mm_per_prompt` caps it), or one video (Ai2's processor)
        return {"image": None, "video": 1}

    def get_data_parser(self) -> MultiModalDataParser:
        return Molmo2DataParser(expected_hidden_size=self._get_expected_hidden_size())

    @functools.cached_property
    def molmo2_config(self) -> Molmo2Config:
        return molmo2_config_of(self.get_hf_config())

    @functools.cached_property
    def preprocessor(self) -> Molmo2Preprocessor:
        tokenizer = self.get_tokenizer()
        config = preprocess_config_of(self.ctx.model_config.model)
        return Molmo2Preprocessor(
            config, VocabIds(tokenizer.get_vocab(), tokenizer), bos_token_of(tokenizer),
            video_config=video_config_of(self.ctx.model_config.model),
        )  # fmt: skip

    def video_token_ids(self, timestamps: Sequence[float]) -> list[int]:
        """A video's prompt ids: its layout with the timestamp texts tokenized (each on its
        own, as Molmo2Preprocessor.build_prompt does)."""
        pre = self.preprocessor
        ids: list[int] = []
        for part in pre.video_tokens(timestamps):
            ids.extend(pre.tokenizer.encode(part) if isinstance(part, str) else [part])
        return ids

    def get_num_frames_with_most_features(self, seq_len: int) -> int:
        """The profiling video's frames: as many as fit seq_len (at most num_frames), at
        DEFAULT_VIDEO_FPS."""
        frames = self.preprocessor.video_config.num_frames
        while frames > 1 and len(self.video_token_ids(self._timestamps(frames))) > seq_len:
            frames -= 1
        return frames

    @staticmethod
    def _timestamps(frames: int) -> list[float]:
        return [k / DEFAULT_VIDEO_FPS for k in range(frames)]

    def get_max_video_tokens(self, seq_len: int) -> int:
        # The longest timestamp text (" 9999.5 ") on every frame: a bound for any video.
        frames = self.get_num_frames_with_most_features(seq_len)
        per_frame = len(self.video_token_ids([9999.5])) + len(self.preprocessor.tokenizer.encode(" "))
        return frames * per_frame

    def get_image_size_with_most_features(self) -> tuple[int, int]:
        """(width, height) of an image whose token count is the largest possible."""
        cfg = self.preprocessor.config
        best, best_size = -1, (cfg.crop_size, cfg.crop_size)
        for rows in range(1, cfg.max_crops + 1):
            for cols in range(1, cfg.max_crops // rows + 1):
                height, width = cfg.canvas_size(rows, cols)
                if molmo2_tiling(width, height, cfg) != (rows, cols):
                    continue
                count = self.preprocessor.image_token_count(width, height)
                if count > best:
                    best, best_size = count, (width, height)
        return best_size

    def get_max_image_tokens(self) -> int:
        return self.preprocessor.image_token_count(*self.get_image_size_with_most_features())

    def get_mm_max_tokens_per_item(
        self, seq_len: int, mm_counts: Mapping[str, int]
    ) -> Mapping[str, int] | None:
        return {"image": self.get_max_image_tokens(), "video": self.get_max_video_tokens(seq_len)}


class Molmo2DummyInputsBuilder(MolmoDummyInputsBuilder):
    """Molmo's dummy images (the size with the most tokens); only the text differs: Molmo 2's
    images go where an image placeholder stands."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE_PROMPT * mm_counts.get("image", 0) + VIDEO_PROMPT * mm_counts.get("video", 0)

    def get_dummy_mm_data(self, seq_len, mm_counts, mm_options):  # type: ignore[override]
        data = dict(super().get_dummy_mm_data(seq_len, mm_counts, mm_options))
        n_videos = mm_counts.get("video", 0)
        if n_videos:
            size = self.info.preprocessor.config.crop_size
            videos = self._get_dummy_videos(
                width=size, height=size, num_frames=self.info.get_num_frames_with_most_features(seq_len),
                num_videos=n_videos, overrides=mm_options.get("video") if mm_options else None,
            )  # fmt: skip
            data["video"] = [(v, {"fps": DEFAULT_VIDEO_FPS}) for v in videos]
        return data


class Molmo2MultiModalProcessor(BaseMultiModalProcessor[Molmo2ProcessingInfo]):
    def _call_hf_processor(
        self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]
    ) -> BatchFeature:
        """Runs our preprocessor on every image (vLLM calls this 'the HF processor')."""
        images = hf_data.get("images") or []
        if not isinstance(images, (list, tuple)):
            images = [images]
        pre = self.info.preprocessor
        inputs: list[Molmo2ImageInputs] = [pre.preprocess(_to_pil(im, i)) for i, im in enumerate(images)]
        out = BatchFeature()
        videos = [pre.preprocess_video(*video_frames_and_fps(v)) for v in hf_data.get("videos") or []]
        if videos:
            out.update(
                {
                    "pixel_values_videos": torch.cat([v.pixel_values_videos for v in videos]),
                    "video_token_pooling": torch.cat([v.video_token_pooling for v in videos]),
                    "video_grids": torch.tensor([v.video_grid for v in videos]),  # [n, 3]
                    "video_num_frames": torch.tensor([v.n_frames for v in videos]),
                    "video_num_tokens": torch.tensor([v.video_token_pooling.shape[0] for v in videos]),
                    "video_timestamps": torch.tensor([t for v in videos for t in v.timestamps],
                                                     dtype=torch.float64),  # fmt: skip
                }
            )
        if not inputs:
            return out
        out.update(
            {
                "pixel_values": torch.cat([x.pixel_values for x in inputs]),  # [C, 729, 588]
                "image_token_pooling": torch.cat([x.image_token_pooling for x in inputs]),  # [M, 4]
                "image_grids": torch.tensor([x.image_grid for x in inputs]),  # [n, 4]
                "image_num_crops": torch.tensor([x.n_crops for x in inputs]),
                "image_num_tokens": torch.tensor([x.image_token_pooling.shape[0] for x in inputs]),
                "image_size": torch.tensor([[x.width, x.height] for x in inputs]),  # [n, 2]
            }
        )
        return out

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        num_crops = hf_inputs.get("image_num_crops", torch.empty(0, dtype=torch.long))
        num_tokens = hf_inputs.get("image_num_tokens", torch.empty(0, dtype=torch.long))
        video_frames = hf_inputs.get("video_num_frames", torch.empty(0, dtype=torch.long))
        video_tokens = hf_inputs.get("video_num_tokens", torch.empty(0, dtype=torch.long))
        return {
            "pixel_values_videos": MultiModalFieldConfig.flat_from_sizes("video", video_frames),
            "video_token_pooling": MultiModalFieldConfig.flat_from_sizes("video", video_tokens),
            "video_timestamps": MultiModalFieldConfig.flat_from_sizes("video", video_frames, keep_on_cpu=True),
            "video_grids": MultiModalFieldConfig.batched("video", keep_on_cpu=True),
            "video_num_frames": MultiModalFieldConfig.batched("video", keep_on_cpu=True),
            "video_num_tokens": MultiModalFieldConfig.batched("video", keep_on_cpu=True),
            "pixel_values": MultiModalFieldConfig.flat_from_sizes("image", num_crops),
            "image_token_pooling": MultiModalFieldConfig.flat_from_sizes("image", num_tokens),
            "image_grids": MultiModalFieldConfig.batched("image", keep_on_cpu=True),
            "image_num_crops": MultiModalFieldConfig.batched("image", keep_on_cpu=True),
            "image_num_tokens": MultiModalFieldConfig.batched("image", keep_on_cpu=True),
            "image_size": MultiModalFieldConfig.batched("image", keep_on_cpu=True),
        }

    def _postprocess_prompt(self, prompt: list[int]) -> list[int]:
        bos = self.info.preprocessor.ids.bos
        return prompt if prompt[:1] == [bos] else [bos, *prompt]

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        pre = self.info.preprocessor
        ids = pre.ids

        def image_tokens(item_idx: int) -> PromptUpdateDetails:
            width, height = (int(v) for v in out_mm_kwargs["image"][item_idx]["image_size"].data)
            tokens = pre.image_layout(width, height).tokens
            return PromptUpdateDetails.select_token_id(tokens, embed_token_id=ids.im_patch)

        def video_tokens(item_idx: int) -> PromptUpdateDetails:
            timestamps = out_mm_kwargs["video"][item_idx]["video_timestamps"].data.tolist()
            tokens = self.info.video_token_ids(timestamps)
            return PromptUpdateDetails.select_token_id(tokens, embed_token_id=ids.im_patch)

        video_prompt = self.info.preprocessor.tokenizer.token_to_id(VIDEO_PROMPT)
        # Tried in order for each image (video): replace its <|image|> (<|video|>), or (no
        # placeholder in the prompt) insert them right after BOS.
        return [
            PromptReplacement(modality="image", target=[ids.image_prompt], replacement=image_tokens),
            PromptInsertion(
                modality="image", target=PromptIndexTargets.prefix([ids.bos]), insertion=image_tokens
            ),
            PromptReplacement(modality="video", target=[video_prompt], replacement=video_tokens),
            PromptInsertion(
                modality="video", target=PromptIndexTargets.prefix([ids.bos]), insertion=video_tokens
            ),
        ]

    def get_dummy_mm_inputs(self, mm_counts: Mapping[str, int], **kwargs: Any):  # type: ignore[override]
        """Images and a video never share a prompt, but vLLM's processor warm-up asks for one
        of each at once: each modality then gets its own dummy prompt (the video's returned)."""
        if mm_counts.get("image", 0) and mm_counts.get("video", 0):
            super().get_dummy_mm_inputs({k: v for k, v in mm_counts.items() if k != "video"}, **kwargs)
            mm_counts = {k: v for k, v in mm_counts.items() if k != "image"}
        return super().get_dummy_mm_inputs(mm_counts, **kwargs)

    def apply(self, inputs, timing_ctx):  # type: ignore[override]
        counts = inputs.mm_data_items.get_all_counts()
        n_images = counts.get("image", 0)
        if n_images and counts.get("video", 0):
            raise ValueError("Molmo 2 takes images or a video in one prompt, not both")
        prompt = inputs.prompt
        if n_images and isinstance(prompt, list):
            n_placeholders = prompt.count(self.info.preprocessor.ids.image_prompt)
            if n_placeholders not in (0, n_images):
                raise ValueError(
                    f"prompt has {n_placeholders} {IMAGE_PROMPT} placeholders for {n_images} "
                    "images: use one per image, or none (images then go after BOS)"
                )
        return super().apply(inputs, timing_ctx)
