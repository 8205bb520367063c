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
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
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
    Molmo2ImageInputs,
    Molmo2Preprocessor,
    molmo2_tiling,
)
from molmo_vllm.config import molmo2_config_of, preprocess_config_of
from molmo_vllm.processor import MolmoDummyInputsBuilder, _to_pil


class VocabIds:
    """A tokenizer's vocabulary as the preprocessor's `TokenizerLike` (ids only; the chat's
    text is tokenized by molmo_vllm.prompt, not here)."""

    def __init__(self, vocab: Mapping[str, int]) -> None:
        self.vocab = vocab

    def token_to_id(self, token: str) -> int | None:
        return self.vocab.get(token)

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError("VocabIds only carries special token ids")


def bos_token_of(tokenizer: Any) -> str:
    """Molmo 2's BOS is the tokenizer's bos_token (Ai2 sets it to `<|im_end|>`)."""
    return getattr(tokenizer, "bos_token", None) or "<|im_end|>"


class Molmo2ProcessingInfo(BaseProcessingInfo):
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}  # any number; `limit_mm_per_prompt` caps it

    @functools.cached_property
    def molmo2_config(self) -> Molmo2Config:
        return molmo2_config_of(self.get_hf_config())

    @functools.cached_property
    def preprocessor(self) -> Molmo2Preprocessor:
        tokenizer = self.get_tokenizer()
        config = preprocess_config_of(self.ctx.model_config.model)
        return Molmo2Preprocessor(config, VocabIds(tokenizer.get_vocab()), bos_token_of(tokenizer))

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
        return {"image": self.get_max_image_tokens()}


class Molmo2DummyInputsBuilder(MolmoDummyInputsBuilder):
    """Molmo's dummy images (the size with the most tokens); only the text differs: Molmo 2's
    images go where an image placeholder stands."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE_PROMPT * mm_counts.get("image", 0)


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
        if not inputs:
            return BatchFeature()
        return BatchFeature(
            {
                "pixel_values": torch.cat([x.pixel_values for x in inputs]),  # [C, 729, 588]
                "image_token_pooling": torch.cat([x.image_token_pooling for x in inputs]),  # [M, 4]
                "image_grids": torch.tensor([x.image_grid for x in inputs]),  # [n, 4]
                "image_num_crops": torch.tensor([x.n_crops for x in inputs]),
                "image_num_tokens": torch.tensor([x.image_token_pooling.shape[0] for x in inputs]),
                "image_size": torch.tensor([[x.width, x.height] for x in inputs]),  # [n, 2]
            }
        )

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        num_crops = hf_inputs.get("image_num_crops", torch.empty(0, dtype=torch.long))
        num_tokens = hf_inputs.get("image_num_tokens", torch.empty(0, dtype=torch.long))
        return {
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

        # Tried in order for each image: replace its <|image|>, or (no placeholder in the
        # prompt) insert all images right after BOS.
        return [
            PromptReplacement(modality="image", target=[ids.image_prompt], replacement=image_tokens),
            PromptInsertion(
                modality="image", target=PromptIndexTargets.prefix([ids.bos]), insertion=image_tokens
            ),
        ]

    def apply(self, inputs, timing_ctx):  # type: ignore[override]
        n_images = inputs.mm_data_items.get_all_counts().get("image", 0)
        prompt = inputs.prompt
        if n_images and isinstance(prompt, list):
            n_placeholders = prompt.count(self.info.preprocessor.ids.image_prompt)
            if n_placeholders not in (0, n_images):
                raise ValueError(
                    f"prompt has {n_placeholders} {IMAGE_PROMPT} placeholders for {n_images} "
                    "images: use one per image, or none (images then go after BOS)"
                )
        return super().apply(inputs, timing_ctx)
