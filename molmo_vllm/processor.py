"""vLLM's multimodal processing for Molmo, built on our own preprocessor (no HF processor,
no remote code).

Three pieces, as vLLM wants them:

* `MolmoProcessingInfo`: the model's config (`MolmoConfig`, read from config.json), the
  special token ids (read from the tokenizer vocabulary, never hard-coded) and a
  `MolmoPreprocessor` on that geometry; image limits and the largest image token count.
* `MolmoDummyInputsBuilder`: the images vLLM profiles memory with (the size with most tokens).
* `MolmoMultiModalProcessor`: runs `MolmoPreprocessor.preprocess` on each image and tells
  vLLM where the image tokens go in the prompt.

Prompt contract (a request with images):
  * the prompt may contain one `<|image|>` token per image; the i-th is replaced by the
    token sequence of the i-th image;
  * a prompt without any `<|image|>` gets the token sequences of all images, in order, right
    after BOS (`<|endoftext|>`); BOS is prepended when the prompt does not start with it;
  * any other count of `<|image|>` tokens is an error.
Only the `<im_patch>` positions receive image features (added to their embeddings).
Text-only requests do not pass through here: their prompt is used as tokenized.

Fields handed to the model per image (crops of several images are concatenated):
  images [c_i, 576, 588], image_masks [c_i, 576], patch_order [num_patches_i],
  num_crops, num_patches, image_size (width, height after EXIF) - see molmo_vllm/model.py.

Two preprocessing paths, chosen by vLLM's `mm_device_do_normalize` (on by default, since
the model declares support; `mm_device_do_normalize=False` turns it off):
  * on: the fast path (molmo_model/fast_preprocessing.py): `images` are raw uint8 crops
    (a quarter of the bytes), normalised by the model on the device;
  * off: the exact path (`MolmoPreprocessor.preprocess`, pixel-identical to Ai2's
    preprocessing): `images` are CLIP-normalised float32.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptIndexTargets,
    PromptInsertion,
    PromptReplacement,
    PromptUpdate,
    PromptUpdateDetails,
)

from molmo_model.config import MolmoConfig
from molmo_model.fast_preprocessing import fast_preprocess
from molmo_model.preprocessing import ImageError, ImageInputs, MolmoPreprocessor
from molmo_vllm.config import molmo_config_of

# Token strings of Molmo's vocabulary (ids are looked up in the checkpoint's tokenizer).
BOS_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<im_start>"
IM_END_TOKEN = "<im_end>"
IM_PATCH_TOKEN = "<im_patch>"
IM_COL_TOKEN = "<im_col>"
IMAGE_PLACEHOLDER = "<|image|>"


@dataclass(frozen=True)
class MolmoTokenIds:
    """Special token ids, read from a tokenizer's vocabulary; satisfies the preprocessor's
    `TokenizerLike` (it never encodes text)."""

    bos_id: int
    im_start_id: int
    im_end_id: int
    im_patch_id: int
    im_col_id: int
    image_id: int

    @classmethod
    def from_vocab(cls, vocab: Mapping[str, int]) -> MolmoTokenIds:
        names = {
            "bos_id": BOS_TOKEN,
            "im_start_id": IM_START_TOKEN,
            "im_end_id": IM_END_TOKEN,
            "im_patch_id": IM_PATCH_TOKEN,
            "im_col_id": IM_COL_TOKEN,
            "image_id": IMAGE_PLACEHOLDER,
        }
        missing = [tok for tok in names.values() if tok not in vocab]
        if missing:
            raise ValueError(f"the tokenizer has no token(s) {missing}: not a Molmo tokenizer")
        return cls(**{field: int(vocab[tok]) for field, tok in names.items()})

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError("MolmoTokenIds only carries special token ids")


def _to_pil(image: object, index: int) -> Image.Image:
    """vLLM hands images over as PIL images, or arrays (HWC uint8 / CHW) when the user
    passed those."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = array.transpose(1, 2, 0)  # CHW -> HWC
        if array.dtype != np.uint8:
            if array.max(initial=0) <= 1.0:
                array = array * 255.0
            array = np.clip(array, 0, 255).astype(np.uint8)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        try:
            image = Image.fromarray(array)
        except (TypeError, ValueError) as e:
            raise ImageError(f"image {index}: array of shape {array.shape} is not an image") from e
    if not isinstance(image, Image.Image):
        raise ImageError(
            f"image {index}: expected a PIL image or an array, got {type(image).__name__}"
        )
    return image


class MolmoProcessingInfo(BaseProcessingInfo):
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}  # any number; `limit_mm_per_prompt` caps it

    @functools.cached_property
    def molmo_config(self) -> MolmoConfig:
        return molmo_config_of(self.get_hf_config())

    @functools.cached_property
    def token_ids(self) -> MolmoTokenIds:
        return MolmoTokenIds.from_vocab(self.get_tokenizer().get_vocab())

    @functools.cached_property
    def preprocessor(self) -> MolmoPreprocessor:
        return MolmoPreprocessor(self.molmo_config.preprocess, self.token_ids)

    @functools.cached_property
    def device_normalize(self) -> bool:
        """Whether crops go to the engine as uint8 and are normalised on the device."""
        mm_config = self.ctx.model_config.multimodal_config
        return bool(getattr(mm_config, "mm_device_do_normalize", False))

    def preprocess(self, image: Image.Image) -> ImageInputs:
        """One image on this engine's path: fast (uint8) or exact (float32)."""
        if self.device_normalize:
            return fast_preprocess(self.preprocessor, image)
        return self.preprocessor.preprocess(image)

    def get_image_size_with_most_features(self) -> tuple[int, int]:
        """(width, height) of an image whose token count is the largest possible."""
        cfg = self.molmo_config.preprocess
        best, best_size = -1, (cfg.crop_size, cfg.crop_size)
        for rows in range(1, cfg.max_crops + 1):
            for cols in range(1, cfg.max_crops // rows + 1):
                size = cfg.canvas_size(rows, cols)[::-1]  # (width, height)
                count = self.preprocessor.image_token_count(*size)
                if count > best:
                    best, best_size = count, size
        return best_size

    def get_max_image_tokens(self) -> int:
        return self.preprocessor.image_token_count(*self.get_image_size_with_most_features())

    def get_mm_max_tokens_per_item(
        self, seq_len: int, mm_counts: Mapping[str, int]
    ) -> Mapping[str, int] | None:
        return {"image": self.get_max_image_tokens()}


class MolmoDummyInputsBuilder(BaseDummyInputsBuilder[MolmoProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return ""  # the image tokens go after BOS, which the processor adds

    def get_dummy_mm_data(
        self,
        seq_len: int,
        mm_counts: Mapping[str, int],
        mm_options: MultiModalDummyOptions,
    ) -> Mapping[str, Any]:
        width, height = self.info.get_image_size_with_most_features()
        return {
            "image": self._get_dummy_images(
                width=width,
                height=height,
                num_images=mm_counts.get("image", 0),
                overrides=mm_options.get("image") if mm_options else None,
            )
        }


class MolmoMultiModalProcessor(BaseMultiModalProcessor[MolmoProcessingInfo]):
    def _call_hf_processor(
        self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]
    ) -> BatchFeature:
        """Runs our preprocessor on every image (vLLM calls this 'the HF processor')."""
        images = hf_data.get("images") or []
        if not isinstance(images, (list, tuple)):
            images = [images]
        inputs = [self.info.preprocess(_to_pil(im, i)) for i, im in enumerate(images)]
        if not inputs:
            return BatchFeature()
        return BatchFeature(
            {
                "images": torch.cat([x.images for x in inputs]),  # [C, 576, 588] uint8/f32
                "image_masks": torch.cat([x.image_masks for x in inputs]),  # [C, 576]
                "patch_order": torch.cat([x.patch_order for x in inputs]),  # [M]
                "num_crops": torch.tensor([x.n_crops for x in inputs]),
                "num_patches": torch.tensor([x.patch_order.numel() for x in inputs]),
                "image_size": torch.tensor([[x.width, x.height] for x in inputs]),  # [n, 2]
            }
        )

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        num_crops = hf_inputs.get("num_crops", torch.empty(0, dtype=torch.long))
        num_patches = hf_inputs.get("num_patches", torch.empty(0, dtype=torch.long))
        return {
            "images": MultiModalFieldConfig.flat_from_sizes("image", num_crops),
            "image_masks": MultiModalFieldConfig.flat_from_sizes("image", num_crops),
            "patch_order": MultiModalFieldConfig.flat_from_sizes("image", num_patches),
            "num_crops": MultiModalFieldConfig.batched("image", keep_on_cpu=True),
            "num_patches": MultiModalFieldConfig.batched("image", keep_on_cpu=True),
            "image_size": MultiModalFieldConfig.batched("image", keep_on_cpu=True),
        }

    def _postprocess_prompt(self, prompt: list[int]) -> list[int]:
        bos = self.info.token_ids.bos_id
        return prompt if prompt[:1] == [bos] else [bos, *prompt]

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        ids = self.info.token_ids
        pre = self.info.preprocessor

        def image_tokens(item_idx: int) -> PromptUpdateDetails:
            width, height = (int(v) for v in out_mm_kwargs["image"][item_idx]["image_size"].data)
            tokens = pre.image_layout(width, height).tokens
            return PromptUpdateDetails.select_token_id(tokens, embed_token_id=ids.im_patch_id)

        # Alternatives, tried in order for each image: replace its <|image|> placeholder, or
        # (no placeholder in the prompt) insert all images right after BOS.
        return [
            PromptReplacement(modality="image", target=[ids.image_id], replacement=image_tokens),
            PromptInsertion(
                modality="image",
                target=PromptIndexTargets.prefix([ids.bos_id]),
                insertion=image_tokens,
            ),
        ]

    def apply(self, inputs, timing_ctx):  # type: ignore[override]
        n_images = inputs.mm_data_items.get_all_counts().get("image", 0)
        prompt = inputs.prompt
        if n_images and isinstance(prompt, list):
            n_placeholders = prompt.count(self.info.token_ids.image_id)
            if n_placeholders not in (0, n_images):
                raise ValueError(
                    f"prompt has {n_placeholders} {IMAGE_PLACEHOLDER} placeholders for "
                    f"{n_images} images: use one per image, or none (images then go after BOS)"
                )
        return super().apply(inputs, timing_ctx)
