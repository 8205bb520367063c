"""vLLM's outputs and errors -> the pieces of OpenAI's responses.

Usage, logprobs (OpenAI's `content` list with `top_logprobs`), finish reasons, the JSON of
stream events, and the mapping of what the engine raises to the status a client should
see: its validation errors are the client's (400), a full queue is 503, anything else 500.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from pydantic_core import to_json

from server.errors import APIError, bad_request
from server.protocol import ChoiceLogprobs, TokenLogprob, TopLogprob, Usage

logger = logging.getLogger("server")


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def logprobs(tokenizer: Decoder, token_ids: Any, positions: Any, top: int) -> ChoiceLogprobs:
    """OpenAI's logprobs for generated tokens. vLLM gives, per position, the `top` best
    tokens (rank 1..top) plus the sampled one with its own rank."""
    content: list[TokenLogprob] = []
    for token_id, position in zip(token_ids, positions or [], strict=False):
        best = sorted(
            (item for item in position.items() if item[1].rank is not None and item[1].rank <= top),
            key=lambda item: item[1].rank,
        )
        content.append(
            TokenLogprob(
                **_token(tokenizer, token_id, position.get(token_id)),
                top_logprobs=[TopLogprob(**_token(tokenizer, t, lp)) for t, lp in best],
            )
        )
    return ChoiceLogprobs(content=content)


def _token(tokenizer: Decoder, token_id: int, lp: Any) -> dict[str, Any]:
    text = lp.decoded_token if lp is not None and lp.decoded_token is not None else None
    if text is None:
        text = tokenizer.decode([token_id])
    # JSON has no -inf or NaN: clamp as OpenAI-compatible servers do.
    value = (
        -9999.0 if lp is None or lp.logprob != lp.logprob or lp.logprob < -9999.0 else lp.logprob
    )
    return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8", errors="replace"))}


def event_json(obj: Any) -> str:
    return to_json(obj).decode()  # pydantic's Rust encoder: several times json.dumps' speed


def finish_reason(reason: str | None) -> str | None:
    """OpenAI's finish_reason of a finished choice ("stop", "length"), or None while it runs.

    A generation vLLM aborted or failed did not finish: the caller gets an APIError (503 to
    retry for an abort, 500 for a request-level engine error, as vLLM's own server), never
    a "stop" that would pass a cut answer off as complete.
    """
    if reason == "abort":
        raise APIError(
            503,
            "the generation was aborted before it finished; retry the request",
            code="generation_aborted",
            headers={"Retry-After": "1"},
        )
    if reason == "error":
        raise APIError(500, "the engine failed this request; retry it", code="engine_error")
    return reason


def sampling(build: Any) -> Any:
    """Build SamplingParams; vLLM's own checks (e.g. n > 1 with greedy sampling) become 400s."""
    from vllm.exceptions import VLLMValidationError

    try:
        return build()
    except VLLMValidationError as e:
        raise bad_request(str(e), param=e.parameter) from None
    except ValueError as e:
        raise bad_request(str(e)) from None


def engine_error(e: BaseException) -> APIError:
    """What the engine raised, as the status the client should see."""
    from vllm.exceptions import GracefulHTTPError, VLLMClientError, VLLMValidationError
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(e, APIError):
        return e
    cause = e.__cause__ if e.__cause__ is not None else e
    if isinstance(cause, VLLMValidationError):
        return bad_request(str(cause), param=cause.parameter)
    if isinstance(cause, (VLLMClientError, ValueError, TypeError)):
        return bad_request(str(cause))
    if isinstance(e, GracefulHTTPError):
        return APIError(
            503,
            str(e) or "the engine's queue is full",
            code="queue_full",
            headers={"Retry-After": "1"},
        )
    if isinstance(e, EngineDeadError):
        return APIError(503, "the engine has stopped", code="engine_dead")
    logger.error("engine error", exc_info=e)
    return APIError(500, f"internal error: {type(cause).__name__}", code="engine_error")
