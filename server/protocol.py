"""Request and response models: OpenAI's chat-completions schema plus Molmo's `points`.

Requests are validated by pydantic; a field out of range becomes a 400 whose `param` names
it (see app.py). `ChatCompletionRequest.to_sampling_params` turns a request into vLLM's
SamplingParams. Unknown request fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_POINT_OBJECTS = 16  # objects one /v1/point request may name

# A 32x32 white PNG with a red square in the middle: the OpenAPI examples' image.
_SMALL_PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAACAAAAAgCAIAAAD8GO2jAAAAPklEQVR42mP8//8/Ay0BEwONwagFoxZQ"
    "DlhwyjAykmYSjvw0GgejFoxaMGrBqAVDvD6gUntpNA5GLRgCFgAAUh4HP+ItnaQAAAAASUVORK5CYII="
)


MAX_STOP_CHARS = 256  # characters of one stop string
# OpenAI parameters this server does not implement: a request that uses them gets a 400
# naming them instead of an answer that silently ignores them.
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call")
MAX_CHOICES = 256  # strings of one structured_outputs.choice


def check_json_schema(schema: Any, where: str) -> None:
    """ValueError naming `where` when `schema` is not a valid JSON schema (by its own draft)."""
    import jsonschema

    if not isinstance(schema, dict):
        raise ValueError(f"{where}: a JSON schema must be an object")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        path = "/".join(str(p) for p in e.absolute_path)
        raise ValueError(f"{where}: not a valid JSON schema ({e.message}{f' at {path}' if path else ''})") from None


def check_grammar(grammar: str) -> None:
    """ValueError when xgrammar (vLLM's default backend) cannot parse the EBNF `grammar`;
    vLLM itself would fail the request with a RuntimeError (a 500) further in."""
    try:
        import xgrammar
    except ImportError:  # pragma: no cover - installed with vLLM
        return
    try:
        xgrammar.Grammar.from_ebnf(grammar)
    except Exception as e:  # xgrammar raises RuntimeError for syntax errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"structured_outputs: grammar does not parse ({first[:300]})") from None


class JSONSchemaFormat(BaseModel):
    """OpenAI's `response_format.json_schema`."""

    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: plain text, any JSON object, or JSON matching a schema."""

    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _check(self) -> ResponseFormat:
        if self.type == "json_schema":
            if self.json_schema is None or self.json_schema.json_schema is None:
                raise ValueError("response_format: type json_schema needs json_schema.schema")
            check_json_schema(self.json_schema.json_schema, "response_format")
        return self


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` extra: exactly one of json, regex, choice, grammar,
    json_object constrains the answer (vLLM's structured-output backend enforces it). Whether
    JSON may hold free whitespace is the server's setting (vLLM 0.32 reads it per engine, not
    per request): `molmo serve --structured-outputs-disable-any-whitespace`."""

    model_config = ConfigDict(extra="forbid", strict=True)
    json_: dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = Field(None, min_length=1, max_length=16_384)
    choice: list[Annotated[str, Field(min_length=1)]] | None = Field(None, min_length=1, max_length=MAX_CHOICES)
    grammar: str | None = Field(None, min_length=1, max_length=65_536)
    json_object: bool | None = None

    @model_validator(mode="after")
    def _check(self) -> StructuredOutputs:
        given = [k for k in ("json", "regex", "choice", "grammar", "json_object")
                 if getattr(self, "json_" if k == "json" else k) not in (None, False)]  # fmt: skip
        if len(given) != 1:
            raise ValueError(f"structured_outputs: give exactly one of json, regex, choice, grammar, "
                             f"json_object (got {', '.join(given) or 'none'})")  # fmt: skip
        if self.json_ is not None:
            check_json_schema(self.json_, "structured_outputs")
        if self.regex is not None:
            import re

            try:
                re.compile(self.regex)
            except re.error as e:
                raise ValueError(f"structured_outputs: regex does not compile ({e})") from None
        if self.grammar is not None:
            check_grammar(self.grammar)
        return self


class _Request(BaseModel):
    # strict: "n": "2" or "stream": "yes" is a 400, not silently coerced.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


def _is_unicode(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ---------------------------------------------------------------- chat request


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ImageURL(_Request):
    url: str = Field(description="data:image/...;base64,... URL, or http(s) when allowed")
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Request):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Request):
    include_usage: bool = False


class ChatCompletionRequest(_Request):
    model_config = ConfigDict(
        extra="ignore",
        allow_inf_nan=False,
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image_url", "image_url": {"url": _SMALL_PNG}},
                                {"type": "text", "text": "Point to the square."},
                            ],
                        }
                    ],
                    "max_tokens": 8,
                }
            ]
        },
    )

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extra sampling parameters.
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)  # 0 or -1: off
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0)
    min_tokens: int | None = Field(None, ge=0, le=INT64_MAX)  # EOS and stop strings wait
    ignore_eos: bool = False
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, max_length=1024, description="token id (as a string) -> bias added to its logit"
    )
    # Structured outputs (vLLM's backend: xgrammar / guidance), OpenAI's and vLLM's way.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    # Not implemented (see UNSUPPORTED); declared so that a use of them is refused.
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 4:
            raise ValueError("stop: at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop: stop sequences must not be empty")
        if not all(_is_unicode(s) for s in stops):
            raise ValueError("stop: stop sequences must be valid Unicode")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop: a stop sequence may have at most {MAX_STOP_CHARS} characters")
        used = [
            name
            for name in UNSUPPORTED
            if getattr(self, name) not in (None, [], {})
            and not (name == "tool_choice" and getattr(self, name) == "none")
        ]
        if used:
            raise ValueError(
                f"{used[0]}: not supported by this server ({', '.join(used)} given); "
                "ask for JSON or points in the prompt instead"
            )
        for token in self.logit_bias or {}:
            if not token.isdigit() or int(token) > 2**31 - 1:
                raise ValueError(f"logit_bias: keys must be token ids, got {token!r}")
        if self.top_logprobs is not None and self.top_logprobs > 0 and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        formats = self.response_format is not None and self.response_format.type != "text"
        if formats and self.structured_outputs is not None:
            raise ValueError("structured_outputs: give the constraint in response_format or in "
                             "structured_outputs, not both")  # fmt: skip
        return self

    def structured_outputs_params(self) -> Any:
        """vLLM's StructuredOutputsParams for this request, or None (free text)."""
        from vllm.sampling_params import StructuredOutputsParams

        so, rf = self.structured_outputs, self.response_format
        if rf is not None and rf.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if rf is not None and rf.type == "json_schema":
            return StructuredOutputsParams(json=rf.json_schema.json_schema)
        if so is None:
            return None
        return StructuredOutputsParams(json=so.json_, regex=so.regex, choice=so.choice, grammar=so.grammar,
                                       json_object=so.json_object or None)  # fmt: skip

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def requested_max_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )

    def to_sampling_params(self, max_tokens: int, stream: bool) -> Any:
        """vLLM SamplingParams for this request (`max_tokens` already resolved against the
        context). Raises vLLM's validation error for combinations only vLLM checks."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        kwargs: dict[str, Any] = {
            "n": self.n,
            "max_tokens": max_tokens,
            "stop": self.stop_list,
            "seed": self.seed,
            "logprobs": (self.top_logprobs or 0) if self.logprobs else None,
            "output_kind": RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
        }
        optional = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "min_tokens": self.min_tokens,
            "ignore_eos": self.ignore_eos or None,
            "logit_bias": {int(t): b for t, b in self.logit_bias.items()}
            if self.logit_bias
            else None,
            "structured_outputs": self.structured_outputs_params(),
        }
        kwargs.update({k: v for k, v in optional.items() if v is not None})
        return SamplingParams(**kwargs)


# ---------------------------------------------------------------- chat response


class PointOut(_Response):
    """A point the model wrote, in pixels of the image it refers to and normalized 0-1."""

    x: float | None = Field(description="pixels from the left edge; null if the image is unknown")
    y: float | None = Field(description="pixels from the top edge; null if the image is unknown")
    x_norm: float
    y_norm: float
    label: str | None = None
    image_index: int = Field(0, description="0-based index of the image in the request")


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(_Response):
    content: list[TokenLogprob] | None = None


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    points: list[PointOut] = Field(default_factory=list)


class Choice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


# ---------------------------------------------------------------- pointing


class PointRequest(_Request):
    model_config = ConfigDict(
        extra="ignore",
        allow_inf_nan=False,
        strict=True,
        json_schema_extra={
            "examples": [{"image": _SMALL_PNG, "object": "squares", "max_tokens": 8}]
        },
    )

    image: str = Field(description="data: URL or plain base64 of a JPEG/PNG/WebP/GIF image")
    # `objects` before `object`: the check of `object` sees whether `objects` was given.
    objects: list[Annotated[str, Field(min_length=1, max_length=1000)]] | None = Field(
        None,
        min_length=1,
        max_length=MAX_POINT_OBJECTS,
        description="several things to point at in the same image: one result each",
    )
    object: str | None = Field(
        None,
        min_length=1,
        max_length=1000,
        description="what to point at (or `objects`)",
        validate_default=True,
    )
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)

    @field_validator("objects")
    @classmethod
    def _check_objects(cls, objects: list[str] | None) -> list[str] | None:
        for i, name in enumerate(objects or []):
            if not name.strip():
                raise ValueError(f"objects[{i}] must name something to point at (not only space)")
        return objects

    @field_validator("object")
    @classmethod
    def _check_object(cls, obj: str | None, info: ValidationInfo) -> str | None:
        has_objects = info.data.get("objects") is not None
        if obj is None and not has_objects:
            if "objects" in info.data:  # absent, not invalid (that error is reported already)
                raise PydanticCustomError("missing", "Field required (or give `objects`)")
            return None
        if obj is not None and has_objects:
            raise ValueError("object: give exactly one of `object` or `objects`, not both")
        if obj is not None and not obj.strip():
            raise ValueError("object: must name something to point at (not only whitespace)")
        return obj

    @property
    def targets(self) -> list[str]:
        """What to point at, in request order (one item for `object`)."""
        return [self.object] if self.objects is None else list(self.objects)  # type: ignore[list-item]


class PixelPoint(_Response):
    x: float
    y: float
    x_norm: float
    y_norm: float


class PointResponse(_Response):
    id: str
    model: str
    points: list[PixelPoint]
    count: int
    text: str
    usage: Usage


class PointManyResponse(_Response):
    """The answer to a request with `objects`: `results[i]` answers `objects[i]`, in the
    shape of a single-object response; `usage` sums the results' usage."""

    id: str
    model: str
    results: list[PointResponse]
    usage: Usage


# ---------------------------------------------------------------- models, errors


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "molmo-serve"
    root: str | None = None
    parent: str | None = None  # an adapter's base model
    max_model_len: int | None = None


class LoadLoRAAdapterRequest(_Request):
    """vLLM's body for POST /v1/load_lora_adapter."""

    lora_name: str = Field(min_length=1, max_length=128)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoRAAdapterRequest(_Request):
    """vLLM's body for POST /v1/unload_lora_adapter (`lora_int_id` accepted and ignored)."""

    lora_name: str = Field(min_length=1, max_length=128)
    lora_int_id: int | None = None


class UnloadedModel(_Response):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
