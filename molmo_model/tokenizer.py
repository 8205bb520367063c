"""Molmo's tokenizer: a thin wrapper over a `tokenizers.Tokenizer`, and our small BPE.

`MolmoTokenizer` loads any Molmo-style `tokenizer.json` (our own, or Ai2's Qwen2-based one
where the image tokens are added tokens at 152064..152068) and reads every special id from
it. `build_tokenizer()` trains our small byte-level BPE for the demo/test models:

- base vocabulary of exactly `vocab_size` ids (512 by default), `<|endoftext|>` among them
  (BOS = EOS = pad, as in Qwen2/Molmo); unused filler tokens pad the vocabulary if training
  yields fewer merges;
- digits are split one per token, as in Qwen2, so numbers in point answers tokenize uniformly;
- Molmo's image tokens `<im_start> <im_end> <im_patch> <im_col> <|image|>` at ids
  `vocab_size + 0..4`, i.e. in the extra `new_embedding` rows;
- trained on a built-in corpus of the text our data holds, deterministically: the same
  vocabulary and merges on every build.

`save(dir)` writes HF files (tokenizer.json, tokenizer_config.json, special_tokens_map.json)
that `transformers.AutoTokenizer` and vLLM load with no remote code; tokenizer_config.json
carries Molmo's chat template (`chat_template.jinja`), so vLLM's own OpenAI server writes the
prompt our server does.

    python -c "from molmo_model.tokenizer import build_tokenizer; build_tokenizer().save('tok')"
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

EOS_TOKEN = "<|endoftext|>"
IMAGE_TOKENS = ("<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>")
DEFAULT_MAX_LENGTH = 4096  # Molmo's max_position_embeddings
# Molmo's prompt format as a chat template (for vLLM's own OpenAI server); `save` writes it.
CHAT_TEMPLATE_FILE = Path(__file__).with_name("chat_template.jinja")


class MolmoTokenizer:
    """Text <-> ids with Molmo's special tokens. All ids come from the tokenizer itself."""

    # What `save` writes as the HF special tokens (Molmo: <|endoftext|> is BOS, EOS and pad).
    BOS, EOS, PAD = EOS_TOKEN, EOS_TOKEN, EOS_TOKEN
    SPECIAL_TOKENS: tuple[str, ...] = IMAGE_TOKENS
    CHAT_TEMPLATE: Path | None = CHAT_TEMPLATE_FILE

    def __init__(self, tokenizer: Tokenizer, model_max_length: int = DEFAULT_MAX_LENGTH):
        self._tok = tokenizer
        # A second copy reads special-token strings in plain text as ordinary text, so that
        # user text cannot smuggle image or end-of-text tokens into a prompt.
        self._plain = Tokenizer.from_str(tokenizer.to_str())
        self._plain.encode_special_tokens = True
        self.model_max_length = int(model_max_length)
        ids = {}
        for token in dict.fromkeys((EOS_TOKEN, self.BOS, self.EOS, *IMAGE_TOKENS, *self.SPECIAL_TOKENS)):
            i = tokenizer.token_to_id(token)
            if i is None:
                raise ValueError(f"tokenizer has no {token!r} token; Molmo needs it")
            ids[token] = i
        self._ids = ids
        self._total = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    # ---- loading and saving ----
    @classmethod
    def from_dir(cls, path: str | Path) -> MolmoTokenizer:
        """Load `tokenizer.json` from a directory (or the file itself); reads
        `model_max_length` from tokenizer_config.json when it is there."""
        p = Path(path)
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.is_file():
            raise ValueError(f"path: no tokenizer.json at {p}")
        max_length = DEFAULT_MAX_LENGTH
        config = file.parent / "tokenizer_config.json"
        if config.is_file():
            value = json.loads(config.read_text()).get("model_max_length")
            # HF writes a huge sentinel (1e30) for "no limit"; keep our default then.
            if isinstance(value, int | float) and 0 < value < 1e9:
                max_length = int(value)
        return cls(Tokenizer.from_file(str(file)), model_max_length=max_length)

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(d / "tokenizer.json"))
        added = {
            str(t_id): {
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            }
            for t_id, t in sorted(self._tok.get_added_tokens_decoder().items())
        }
        names = {"bos_token": self.BOS, "eos_token": self.EOS, "pad_token": self.PAD}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **names,
            "add_bos_token": False,  # the prompt builder adds BOS itself
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": self.model_max_length,
            "added_tokens_decoder": added,
            "additional_special_tokens": list(self.SPECIAL_TOKENS),
        }
        if self.CHAT_TEMPLATE is not None:
            config["chat_template"] = self.CHAT_TEMPLATE.read_text()
        special_map = {**names, "additional_special_tokens": list(self.SPECIAL_TOKENS)}
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (d / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")

    # ---- text <-> ids ----
    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`, with no BOS/EOS added (the prompt builder adds BOS).

        Special-token strings in `text` ("<im_patch>", "<|endoftext|>") are ordinary text
        unless `allow_special` is True, in which case each becomes its single special id.
        """
        if not isinstance(text, str):
            raise ValueError(f"text must be a string, got {type(text).__name__}")
        tok = self._tok if allow_special else self._plain
        return tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Ids that name no token (e.g. unused rows of the logits of an
        untrained model) are skipped, as HF tokenizers do; negative ids are an error."""
        ids = [int(i) for i in ids]
        if any(i < 0 for i in ids):
            raise ValueError(f"ids must be non-negative, got {min(ids)}")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    # ---- ids ----
    @property
    def bos_id(self) -> int:
        return self._ids[self.BOS]

    @property
    def eos_id(self) -> int:
        return self._ids[self.EOS]

    @property
    def pad_id(self) -> int:
        return self._ids[EOS_TOKEN]

    @property
    def im_start_id(self) -> int:
        return self._ids["<im_start>"]

    @property
    def im_end_id(self) -> int:
        return self._ids["<im_end>"]

    @property
    def im_patch_id(self) -> int:
        return self._ids["<im_patch>"]

    @property
    def im_col_id(self) -> int:
        return self._ids["<im_col>"]

    @property
    def image_id(self) -> int:
        return self._ids["<|image|>"]

    @property
    def embedding_size(self) -> int:
        """Rows of `wte.embedding`: the image tokens start the extra rows right after it."""
        return min(self._ids[t] for t in self.SPECIAL_TOKENS)

    @property
    def vocab_size(self) -> int:
        """The base vocabulary the model config's `vocab_size` holds. In every Molmo release
        it equals `embedding_size` (152064 for Molmo-7B-D, 512 for ours)."""
        return self.embedding_size

    @property
    def total_size(self) -> int:
        """One past the largest id, image tokens included."""
        return self._total


# ---------------------------------------------------------------- our small BPE

_COLORS = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black",
           "white", "gray", "cyan")  # fmt: skip
_SHAPES = (("circle", "circles"), ("square", "squares"), ("triangle", "triangles"),
           ("star", "stars"), ("rectangle", "rectangles"), ("diamond", "diamonds"),
           ("hexagon", "hexagons"), ("cross", "crosses"))  # fmt: skip
_SIZES = ("small", "large", "big", "tiny", "medium")
_PLACES = ("top left", "top right", "bottom left", "bottom right", "center", "left side",
           "right side", "top", "bottom", "middle")  # fmt: skip
_ENGLISH = (
    "The image shows a clock on the wall. There is a dog next to the door and a cat on the "
    "table. What is in this picture? This is a photo of a street with people, cars and trees. "
    "Describe the image in detail. It is a sunny day and the sky is blue. The man is holding "
    "a cup of coffee while the woman reads a book. How many people can you see? Where is the "
    "ball? Which one is bigger? Look at the object that is closest to the camera. Please "
    "answer the question with a single word or phrase. Yes, no, maybe, I think so. Count "
    "them one by one, from top to bottom and left to right. Each of these shapes has a "
    "different color, and some of them are above or below the others."
)


def _corpus() -> Iterator[str]:
    """The training text: questions and answers in the shapes our data takes. Numbers come
    from fixed arithmetic, never a RNG, so the corpus (and the BPE) never changes."""
    k = 0
    for ci, color in enumerate(_COLORS):
        for si, (shape, shapes) in enumerate(_SHAPES):
            size = _SIZES[(ci + si) % len(_SIZES)]
            place = _PLACES[(ci * 3 + si) % len(_PLACES)]
            n = (ci * 7 + si * 3) % 9
            pts = " ".join(
                f'x{j + 1}="{(k * 37 + j * 13) % 1000 / 10:.1f}" '
                f'y{j + 1}="{(k * 53 + j * 29) % 1000 / 10:.1f}"'
                for j in range(n)
            )
            k += 1
            x, y = (k * 71) % 1000 / 10, (k * 43) % 1000 / 10
            hour, minute = k % 12 + 1, (k * 7) % 60
            yield f" User: Point to all the {color} {shapes}. Assistant:"
            yield (
                f' <points {pts} alt="{color} {shapes}">{color} {shapes}</points>'
                if n > 1
                else " There are none."
            )
            yield f" User: Point to the {size} {color} {shape}. Assistant:"
            yield f' <point x="{x:.1f}" y="{y:.1f}" alt="{size} {color} {shape}">{shape}</point>'
            yield f" User: How many {color} {shapes} are there? Assistant: {n}"
            yield f" User: How many {shapes} are there? Assistant: There are {n} {shapes}."
            yield f" User: What time is it? Assistant: The time is {hour}:{minute:02d}."
            yield f" User: What color is the {shape}? Assistant: The {shape} is {color}."
            yield (
                f" User: Describe the image. Assistant: A {size} {color} {shape} in the {place}"
                f" of the image, and {n} {_COLORS[(ci + 1) % len(_COLORS)]} {shapes} around it."
            )
            yield f" long_caption {40 + k}: {_ENGLISH}"


def build_tokenizer(
    vocab_size: int = 512, model_max_length: int = DEFAULT_MAX_LENGTH
) -> MolmoTokenizer:
    """Train our small byte-level BPE (see the module docstring). Deterministic."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(f"vocab_size must be at least {len(alphabet) + 1}, got {vocab_size}")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=sorted(alphabet),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)

    # Pad the base vocabulary to exactly vocab_size with fillers that no merge can produce.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab), vocab_size):
        vocab[f"<|unused_{i}|>"] = i
    tok = Tokenizer.from_str(json.dumps(spec))

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in IMAGE_TOKENS])
    out = MolmoTokenizer(tok, model_max_length=model_max_length)
    assert out.embedding_size == vocab_size and out.image_id == vocab_size + 4, "special ids"
    return out


# ---------------------------------------------------------------- Molmo 2's tokens

# Molmo 2's image/video tokens in the order of its extra embedding rows (Molmo2-4B/8B put them
# at 151936..151945, right after Qwen3's vocabulary); <|image|> and <|video|> are the
# placeholders the processor expands.
MOLMO2_TOKENS = ("<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<low_res_im_start>",
                 "<|image|>", "<im_low>", "<frame_start>", "<frame_end>", "<|video|>")  # fmt: skip
MOLMO2_CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")  # Qwen3's chat tokens (in the base vocabulary)


class Molmo2Tokenizer(MolmoTokenizer):
    """A Molmo 2 tokenizer (Qwen3's or OLMo 3's with Ai2's image tokens, or our small BPE with
    the same special tokens). BOS, EOS and pad are the release's tokenizer_config.json names
    when `from_dir` finds them; otherwise Molmo2-4B/8B's: BOS = EOS = `<|im_end|>` (Qwen3 has
    no BOS, so Ai2's converter reuses EOS), pad `<|endoftext|>`."""

    BOS, EOS, PAD = "<|im_end|>", "<|im_end|>", EOS_TOKEN
    SPECIAL_TOKENS = MOLMO2_TOKENS
    CHAT_TEMPLATE = None  # prompts come from molmo_model.molmo2.preprocessing / molmo_vllm.prompt

    def __init__(
        self,
        tokenizer: Tokenizer,
        model_max_length: int = DEFAULT_MAX_LENGTH,
        bos: str | None = None,
        eos: str | None = None,
        pad: str | None = None,
    ):
        # Instance values shadow the class defaults (OLMo 3's BOS is its own <|endoftext|>).
        self.BOS, self.EOS, self.PAD = bos or self.BOS, eos or self.EOS, pad or self.PAD
        super().__init__(tokenizer, model_max_length=model_max_length)

    @classmethod
    def from_dir(cls, path: str | Path) -> Molmo2Tokenizer:
        base = super().from_dir(path)
        p = Path(path)
        config = (p if p.is_dir() else p.parent) / "tokenizer_config.json"
        names: dict[str, str] = {}
        if config.is_file():
            data = json.loads(config.read_text())
            for key, arg in (("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "pad")):
                value = data.get(key)
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str) and value:
                    names[arg] = value
        return cls(base._tok, model_max_length=base.model_max_length, **names)


def build_molmo2_tokenizer(
    vocab_size: int = 512, model_max_length: int = DEFAULT_MAX_LENGTH
) -> Molmo2Tokenizer:
    """Our small BPE laid out as Molmo 2's: `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` in
    the base vocabulary (ids 0..2: EOS must be a logit row), Molmo 2's ten image/video tokens
    at vocab_size + 0..9 (Ai2's order, so `molmo2_tiny(vocab_size)`'s token ids match)."""
    base = json.loads(build_tokenizer(vocab_size - len(MOLMO2_CHAT_TOKENS), model_max_length)._tok.to_str())
    vocab = base["model"]["vocab"]  # id 0 is <|endoftext|>; ids below vocab_size - 2 are the BPE
    shifted = {t: (i + len(MOLMO2_CHAT_TOKENS) if i > 0 else 0) for t, i in vocab.items()}
    for k, t in enumerate(MOLMO2_CHAT_TOKENS):
        shifted[t] = 1 + k
    # Merges name tokens, not ids, so shifting ids keeps the BPE; v1's image tokens are dropped.
    base["model"]["vocab"] = shifted
    base["added_tokens"] = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for t, i in [(EOS_TOKEN, 0), *((t, 1 + k) for k, t in enumerate(MOLMO2_CHAT_TOKENS)),
                     *((t, vocab_size + k) for k, t in enumerate(MOLMO2_TOKENS))]
    ]  # fmt: skip
    out = Molmo2Tokenizer(Tokenizer.from_str(json.dumps(base)), model_max_length=model_max_length)
    assert out.embedding_size == vocab_size and out.token_to_id("<|image|>") == vocab_size + 5
    return out
