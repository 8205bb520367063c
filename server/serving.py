"""The serving layer: a validated request -> engine -> response, SSE stream or APIError.

Request path: admit (queue limit) -> images (fetch, decode, limits) -> prompt ids and the
context check -> SamplingParams -> `AsyncLLM.generate`. Every client mistake becomes an
APIError (4xx) before the engine sees the request; what the engine still refuses is mapped
to a 4xx too. Only the server's own faults are 500s.

Cancellation: the engine's generator always runs in a task of its own, so that a client
disconnect (which cancels the route or the stream) cancels that task exactly once and
vLLM's generator aborts the request in the engine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from molmo_model.checkpoint import MOLMO
from molmo_vllm.prompt import (
    Chat,
    PromptError,
    Tokenizer,
    engine_prompt,
    parse_chat,
    point_question,
    prompt_token_ids,
)
from server.adapters import Adapters, ServedAdapter, adapter_error
from server.config import ServerConfig
from server.engine import ModelInfo
from server.errors import APIError, bad_request
from server.images import DecodePool, ImageFetcher, RemoteImages
from server.metrics import ServerMetrics
from server.outputs import engine_error, event_json, finish_reason, logprobs, sampling, usage
from server.points import pixel_points, points_in_answer
from server.protocol import (
    AssistantMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    Choice,
    PointManyResponse,
    PointRequest,
    PointResponse,
    random_id,
)

POINT_MAX_TOKENS = 512  # default answer budget of /v1/point (40 points fit)
OUTPUT_BUFFER = 4  # engine outputs held per request for a reader that has not taken them
_END = object()


@dataclass
class Prepared:
    """A request ready for the engine."""

    prompt: dict[str, Any]  # {"prompt_token_ids", "multi_modal_data"?}
    prompt_len: int  # tokens after the image placeholders are expanded
    sizes: list[tuple[int, int]]  # (width, height) of each image, after EXIF
    model: str = ""  # the model name the response reports (the base's or an adapter's)
    lora: Any = None  # vLLM's LoRARequest for an adapter, None for the base


@dataclass
class _Timing:
    t0: float  # request parsed (perf_counter)
    first: float | None = None
    last: float | None = None
    gaps: list[tuple[float, int]] = field(default_factory=list)

    def tokens(self, n: int) -> None:
        now = time.perf_counter()
        if n <= 0:
            return
        if self.first is None:
            self.first = now
            n -= 1  # the first token starts the inter-token clock
        elif self.last is not None:
            self.gaps.append((now - self.last, n))
        self.last = now


class Slot:
    """One admitted request: counted in flight, `waiting` until it reaches the engine, then
    `running` until released. `release` is idempotent."""

    def __init__(self, serving: Serving) -> None:
        self._serving = serving
        self.state = "waiting"
        serving.in_flight += 1
        serving.metrics.waiting.inc()

    def start(self) -> None:
        if self.state == "waiting":
            self.state = "running"
            self._serving.metrics.waiting.dec()
            self._serving.metrics.running.inc()

    def release(self) -> None:
        if self.state == "released":
            return
        gauge = (
            self._serving.metrics.waiting
            if self.state == "waiting"
            else self._serving.metrics.running
        )
        gauge.dec()
        self.state = "released"
        self._serving.in_flight -= 1


class Serving:
    def __init__(
        self,
        config: ServerConfig,
        info: ModelInfo,
        tokenizer: Tokenizer,
        metrics: ServerMetrics,
    ) -> None:
        self.config = config
        self.info = info
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.engine: Any = None  # vllm AsyncLLM, once started
        self.max_model_len = config.max_model_len or info.max_position_embeddings
        # The processor's own geometry code (molmo_vllm's processors count with the same class).
        self.preprocessor = info.preprocessor(tokenizer)
        self.images = ImageFetcher(
            max_pixels=config.max_image_pixels,
            allow_remote=config.allow_remote_images,
            # Molmo 2 stretches images (no aspect-kept fit): no reduced decoding for it.
            geometry=info.preprocess if info.family == MOLMO else None,
            reduce=info.family == MOLMO,
            pool=DecodePool(config.decode_workers, config.decode_pixel_budget),
            remote=RemoteImages(
                timeout=config.remote_image_timeout,
                max_bytes=config.remote_image_max_bytes,
                allowed_domains=config.remote_image_domains,
                allow_private=config.allow_private_image_addresses,
                ports=config.remote_image_ports,
            ),
        )
        self.in_flight = 0
        self._aborts: set[asyncio.Task] = set()
        self._max_token_bytes = _max_token_bytes(tokenizer)
        # Adapters given at start-up are checked here: a bad one stops the server (exit 2).
        self.adapters: Adapters | None = None
        if config.enable_lora and info.family != MOLMO:
            raise ValueError("enable_lora: LoRA adapters are served for Molmo checkpoints only, "
                             f"not for {info.family} yet")  # fmt: skip
        if config.enable_lora:
            self.adapters = Adapters(info.name, info.path, info.config, config.max_lora_rank)
            for name, path in config.lora_modules:
                self.adapters.add(name, path)

    # ---------------------------------------------------------------- state

    def attach(self, engine: Any) -> None:
        self.engine = engine
        self.max_model_len = int(engine.model_config.max_model_len)
        self.metrics.engine_unfinished.set_function(
            lambda: self.engine.get_num_unfinished_requests() if self.engine is not None else 0
        )

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.engine.errored

    def resolve_model(self, name: str | None) -> tuple[str, Any]:
        """(the name responses report, the LoRARequest or None) for a request's `model`;
        404 for a name this server does not serve."""
        if self.adapters is not None:
            adapter = self.adapters.resolve(name)
            return (adapter.name, adapter.request()) if adapter else (self.info.name, None)
        if name is not None and name not in (self.info.name, self.info.path):
            raise APIError(
                404,
                f"model {name!r} is not served here; this server serves {self.info.name!r}",
                param="model",
                code="model_not_found",
            )
        return self.info.name, None

    async def preload_adapters(self, engine: Any) -> None:
        for adapter in self.served_adapters():
            await engine.add_lora(adapter.request())

    async def load_adapter(self, name: str, path: str) -> ServedAdapter:
        """Checks the adapter against the base, loads it into the engine, serves it by name."""
        if self.adapters is None or not self.config.allow_runtime_lora:
            raise APIError(403, "loading adapters at run time is off on this server (start it with "
                           "--allow-runtime-lora)", code="runtime_lora_disabled")  # fmt: skip
        if not self.ready:
            raise APIError(503, "the model is still loading; retry shortly", code="engine_not_ready",
                           headers={"Retry-After": "5"})  # fmt: skip
        try:  # reads the adapter's tensors: off the event loop
            adapter = await asyncio.to_thread(self.adapters.check, name, path)
        except ValueError as e:
            raise adapter_error(e) from None
        adapter.int_id = self.adapters.reserve_id()
        try:
            await self.engine.add_lora(adapter.request())
        except Exception as e:  # what vLLM's own checks refuse
            raise APIError(400, f"the engine refused adapter {name!r}: {e}", param="lora_path",
                           code="invalid_adapter") from None  # fmt: skip
        try:
            return self.adapters.register(adapter)
        except ValueError as e:  # the same name loaded by a concurrent request meanwhile
            await self.engine.remove_lora(adapter.int_id)
            raise adapter_error(e) from None

    async def unload_adapter(self, name: str) -> ServedAdapter:
        if self.adapters is None or not self.config.allow_runtime_lora:
            raise APIError(403, "unloading adapters at run time is off on this server (start it with "
                           "--allow-runtime-lora)", code="runtime_lora_disabled")  # fmt: skip
        adapter = self.adapters.remove(name)
        if self.engine is not None:
            await self.engine.remove_lora(adapter.int_id)
        return adapter

    def served_adapters(self) -> list[ServedAdapter]:
        return list(self.adapters.by_name.values()) if self.adapters is not None else []

    def admit(self) -> Slot:
        """A slot for one request; refused when --max-queue requests are already in flight."""
        if not self.ready:
            raise APIError(
                503,
                "the model is still loading; retry shortly",
                code="engine_not_ready",
                headers={"Retry-After": "5"},
            )
        if self.in_flight >= self.config.max_queue:
            raise APIError(
                429,
                f"the server's queue is full ({self.config.max_queue} requests); retry later",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        return Slot(self)

    # ---------------------------------------------------------------- preparation

    async def prepare(
        self,
        messages: list[dict[str, str]],
        image_refs: list[tuple[str, str]],
        bare_base64: bool = False,
    ) -> Prepared:
        images, sizes = await self.load_images(image_refs, bare_base64)
        return await self.prepare_prompt(messages, images, sizes)

    async def load_images(
        self, image_refs: list[tuple[str, str]], bare_base64: bool = False
    ) -> tuple[list[Image.Image], list[tuple[int, int]]]:
        """The request's images, decoded, and their sizes as sent (decoding may reduce the
        pixels)."""
        if len(image_refs) > self.config.max_images:
            raise bad_request(
                f"{len(image_refs)} images in the request; this server accepts at most "
                f"{self.config.max_images}",
                param="messages",
                code="too_many_images",
            )
        if not image_refs:
            return [], []
        start = time.perf_counter()
        decoded = await self.images.load_all(image_refs, bare_base64)
        self.metrics.image_preprocess.observe(time.perf_counter() - start)
        return [d.image for d in decoded], [d.size for d in decoded]

    async def prepare_prompt(
        self,
        messages: list[dict[str, str]],
        images: list[Image.Image],
        sizes: list[tuple[int, int]],
    ) -> Prepared:
        """Prompt ids for `messages` with the decoded `images`, checked against the context."""
        ids = await self._prompt_ids(messages, len(images))
        image_tokens = sum(self.preprocessor.image_token_count(w, h) for w, h in sizes)
        prompt_len = len(ids) - len(images) + image_tokens
        if prompt_len >= self.max_model_len:
            raise bad_request(
                f"the prompt takes {prompt_len} tokens ({image_tokens} of them for "
                f"{len(images)} image(s)); this model's context is {self.max_model_len} tokens",
                param="messages",
                code="context_length_exceeded",
            )
        return Prepared(engine_prompt(ids, images), prompt_len, sizes)

    async def _prompt_ids(self, messages: list[dict[str, str]], n_images: int) -> list[int]:
        # No token spans more bytes than the vocabulary's longest: a text whose bytes
        # exceed the context times that is too long without tokenizing it. A character is
        # at most 4 bytes, so only texts that could be too long are encoded to count.
        chars = sum(len(m["content"]) for m in messages)
        limit = self.max_model_len * self._max_token_bytes
        if 4 * chars > limit:
            size = sum(len(m["content"].encode("utf-8", "surrogatepass")) for m in messages)
            if size > limit:
                raise bad_request(
                    f"the messages take {size} bytes of text, more than this model's context "
                    f"of {self.max_model_len} tokens can hold",
                    param="messages",
                    code="context_length_exceeded",
                )
        if chars > 20_000:  # long texts tokenize off the event loop
            return await asyncio.to_thread(_token_ids, self.tokenizer, messages, n_images)
        return _token_ids(self.tokenizer, messages, n_images)

    def max_tokens(self, requested: int | None, prompt_len: int, param: str) -> int:
        room = self.max_model_len - prompt_len
        if requested is None:
            return room
        if requested > room:
            raise bad_request(
                f"{param}={requested} plus the prompt's {prompt_len} tokens exceed this "
                f"model's context of {self.max_model_len} tokens (at most {room} here)",
                param=param,
                code="context_length_exceeded",
            )
        return requested

    # ---------------------------------------------------------------- chat

    async def chat(
        self, req: ChatCompletionRequest, t0: float, slot: Slot
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        """A response, or (stream=True) an iterator of SSE events. Errors before the first
        event raise APIError; the caller releases `slot` when the response is done."""
        model, lora = self.resolve_model(req.model)
        if req.n > self.config.max_n:
            raise bad_request(f"n must be <= {self.config.max_n} on this server", param="n")
        chat = chat_of(req.messages)
        prepared = await self.prepare(chat.turns, [(r.source, r.param) for r in chat.images])
        prepared.model, prepared.lora = model, lora
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = self.max_tokens(req.requested_max_tokens, prepared.prompt_len, param)
        params = sampling(lambda: req.to_sampling_params(max_tokens, stream=req.stream))
        request_id = random_id("chatcmpl")
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._stream_chat(req, prepared, params, request_id, include_usage, t0, slot)
        final = await self._generate_final(prepared, params, request_id, t0, slot)
        choices = []
        completion_tokens = 0
        for o in sorted(final.outputs, key=lambda o: o.index):
            completion_tokens += len(o.token_ids)
            choices.append(
                Choice(
                    index=o.index,
                    message=AssistantMessage(
                        content=o.text, points=points_in_answer(o.text, prepared.sizes)
                    ),
                    logprobs=logprobs(
                        self.tokenizer, o.token_ids, o.logprobs, req.top_logprobs or 0
                    )
                    if req.logprobs
                    else None,
                    finish_reason=finish_reason(o.finish_reason),
                )
            )
        return ChatCompletionResponse(
            id=request_id,
            model=prepared.model,
            choices=choices,
            usage=usage(_prompt_tokens(final, prepared), completion_tokens),
        )

    async def _stream_chat(
        self,
        req: ChatCompletionRequest,
        prepared: Prepared,
        params: Any,
        request_id: str,
        include_usage: bool,
        t0: float,
        slot: Slot,
    ) -> AsyncIterator[str]:
        created = int(time.time())
        base = {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": prepared.model,
        }
        extra = {"usage": None} if include_usage else {}

        def event(choices: list[dict[str, Any]]) -> str:
            return f"data: {event_json({**base, 'choices': choices, **extra})}\n\n"

        texts = [""] * req.n
        completion_tokens = 0
        prompt_tokens = prepared.prompt_len
        timing = _Timing(t0)
        # The role rides on each choice's first chunk, which carries its first token (as
        # vLLM's server does): an early empty chunk would make clients time a first token
        # that the engine has not produced yet.
        role_sent = [False] * req.n

        def delta(index: int, body: dict[str, Any]) -> dict[str, Any]:
            if role_sent[index]:
                return body
            role_sent[index] = True
            return {"role": "assistant", **body}

        try:
            async for out in self._generate(prepared, params, request_id, slot):
                if out.prompt_token_ids is not None:
                    prompt_tokens = len(out.prompt_token_ids)
                new_tokens = sum(len(o.token_ids) for o in out.outputs)
                timing.tokens(new_tokens)
                completion_tokens += new_tokens
                choices, finished = [], []
                for o in out.outputs:
                    texts[o.index] += o.text
                    if o.text or o.token_ids:
                        choices.append(
                            {
                                "index": o.index,
                                "delta": delta(o.index, {"content": o.text}),
                                "logprobs": logprobs(
                                    self.tokenizer, o.token_ids, o.logprobs, req.top_logprobs or 0
                                ).model_dump()
                                if req.logprobs
                                else None,
                                "finish_reason": None,
                            }
                        )
                    if o.finish_reason is not None:  # points go in the choice's last chunk
                        points = points_in_answer(texts[o.index], prepared.sizes)
                        finished.append(
                            {
                                "index": o.index,
                                "delta": delta(
                                    o.index, {"points": [p.model_dump() for p in points]}
                                ),
                                "logprobs": None,
                                "finish_reason": finish_reason(o.finish_reason),
                            }
                        )
                if choices:
                    yield event(choices)
                if finished:
                    yield event(finished)
        except APIError as e:
            yield e.sse()
        else:
            self._observe(timing, prompt_tokens, completion_tokens)
            if include_usage:
                counts = usage(prompt_tokens, completion_tokens).model_dump()
                yield f"data: {event_json({**base, 'choices': [], 'usage': counts})}\n\n"
        yield "data: [DONE]\n\n"

    # ---------------------------------------------------------------- point

    async def point(
        self, req: PointRequest, t0: float, slot: Slot
    ) -> PointResponse | PointManyResponse:
        """One object: a `PointResponse`. Several (`objects`): the image is decoded once and
        one engine request per object is submitted at once, so that the engine batches them
        and they share the image (vLLM's encoder cache and prefix cache hold it under the
        same image hash); the results come back in request order."""
        model, lora = self.resolve_model(req.model)
        images, sizes = await self.load_images([(req.image, "image")], bare_base64=True)
        # Every prompt is checked (context length, max_tokens) before any reaches the engine.
        checked = []
        for name in req.targets:
            messages = [{"role": "user", "content": point_question(name)}]
            prepared = await self.prepare_prompt(messages, images, sizes)
            prepared.model, prepared.lora = model, lora
            requested = (
                req.max_tokens
                if req.max_tokens is not None
                else min(POINT_MAX_TOKENS, self.max_model_len - prepared.prompt_len)
            )
            checked.append(
                (prepared, self.max_tokens(requested, prepared.prompt_len, "max_tokens"))
            )
        if req.objects is None:
            return await self._point_one(req, *checked[0], t0, slot)
        tasks = [asyncio.ensure_future(self._point_one(req, *c, t0, slot)) for c in checked]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:  # one failed: abort the others in the engine
                task.cancel()
            raise
        return PointManyResponse(
            id=random_id("point"),
            model=model,
            results=results,
            usage=usage(
                sum(r.usage.prompt_tokens for r in results),
                sum(r.usage.completion_tokens for r in results),
            ),
        )

    async def _point_one(
        self, req: PointRequest, prepared: Prepared, max_tokens: int, t0: float, slot: Slot
    ) -> PointResponse:
        def params() -> Any:
            from vllm import SamplingParams
            from vllm.sampling_params import RequestOutputKind

            return SamplingParams(
                max_tokens=max_tokens,
                temperature=0.0 if req.temperature is None else req.temperature,
                seed=req.seed,
                output_kind=RequestOutputKind.FINAL_ONLY,
            )

        request_id = random_id("point")
        final = await self._generate_final(prepared, sampling(params), request_id, t0, slot)
        o = final.outputs[0]
        finish_reason(o.finish_reason)  # an aborted or failed generation is an error here too
        points = pixel_points(o.text, prepared.sizes[0])
        return PointResponse(
            id=request_id,
            model=prepared.model,
            points=points,
            count=len(points),
            text=o.text,
            usage=usage(_prompt_tokens(final, prepared), len(o.token_ids)),
        )

    # ---------------------------------------------------------------- engine

    async def _generate(
        self, prepared: Prepared, params: Any, request_id: str, slot: Slot
    ) -> AsyncIterator[Any]:
        """The engine's outputs for one request. The engine generator runs in its own task
        (see the module docstring); closing or cancelling this iterator aborts it."""
        # Bounded: a reader that stalls stops the pump, and vLLM then merges the request's
        # undelivered deltas into one output instead of queueing one per step.
        queue: asyncio.Queue = asyncio.Queue(maxsize=OUTPUT_BUFFER)

        async def pump() -> None:
            try:
                async for out in self.engine.generate(
                    prepared.prompt, params, request_id, lora_request=prepared.lora
                ):
                    await queue.put(out)
                await queue.put(_END)
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # handed to the consumer, which maps it
                await queue.put(e)

        task = asyncio.create_task(pump())
        slot.start()
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise engine_error(item)
                yield item
        finally:
            if not task.done():
                task.cancel()  # vLLM's generator aborts the request on cancellation
                self._aborts.add(task)
                task.add_done_callback(self._aborts.discard)

    async def _generate_final(
        self, prepared: Prepared, params: Any, request_id: str, t0: float, slot: Slot
    ) -> Any:
        submitted = time.perf_counter()
        final = None
        async for out in self._generate(prepared, params, request_id, slot):
            final = out
        if final is None:
            raise APIError(500, "the engine returned no output", code="engine_error")
        completion_tokens = sum(len(o.token_ids) for o in final.outputs)
        timing = _Timing(t0)
        stats = getattr(final, "metrics", None)
        if stats is not None and getattr(stats, "first_token_latency", 0.0) > 0:
            timing.first = submitted + stats.first_token_latency
            n = getattr(stats, "num_generation_tokens", 0)
            if n > 1 and stats.last_token_ts > stats.first_token_ts:
                timing.gaps.append((stats.last_token_ts - stats.first_token_ts, n - 1))
        self._observe(
            timing, len(final.prompt_token_ids or []) or prepared.prompt_len, completion_tokens
        )
        return final

    def _observe(self, timing: _Timing, prompt_tokens: int, completion_tokens: int) -> None:
        m = self.metrics
        m.observe_tokens(None if timing.first is None else timing.first - timing.t0, timing.gaps)
        m.e2e.observe(time.perf_counter() - timing.t0)
        m.prompt_tokens.inc(prompt_tokens)
        m.generation_tokens.inc(completion_tokens)

    # ---------------------------------------------------------------- formatting

    async def aclose(self) -> None:
        await self.images.aclose()
        for task in list(self._aborts):
            task.cancel()


def _prompt_tokens(final: Any, prepared: Prepared) -> int:
    """The engine's count (image tokens expanded); ours if it gave none."""
    return len(final.prompt_token_ids) if final.prompt_token_ids else prepared.prompt_len


def chat_of(messages: list[ChatMessage]) -> Chat:
    """The request's messages split by `molmo_vllm.prompt.parse_chat` (400 naming the field)."""
    try:
        return parse_chat([m.model_dump(exclude_none=True) for m in messages])
    except PromptError as e:
        raise bad_request(str(e), param=e.param) from None


def _max_token_bytes(tokenizer: Tokenizer) -> int:
    """An upper bound on the bytes of text one token stands for (64 if unknown): a token's
    own string in UTF-8 is never shorter than the text it encodes (byte-level BPE writes a
    byte as one character of up to 2 bytes)."""
    id_to_token = getattr(tokenizer, "id_to_token", None)
    size = getattr(tokenizer, "total_size", None)
    if id_to_token is None or not isinstance(size, int):
        return 64
    return max(1, *(len((id_to_token(i) or "").encode("utf-8")) for i in range(size)))


def _token_ids(tokenizer: Tokenizer, turns: list[dict[str, str]], n_images: int) -> list[int]:
    try:
        return prompt_token_ids(tokenizer, turns, n_images)
    except PromptError as e:
        raise bad_request(str(e), param=e.param) from None
