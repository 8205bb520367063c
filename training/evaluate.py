"""Evaluation on held-out synthetic data: pointing, counting and clock reading.

Queries come from the annotations of held-out examples (`training.data.synthetic`, split "test"
by default): "point" questions are scored for pointing, "count" questions for counting and
"clock" questions for reading the time. A model answers them through an engine:

- `vllm` (what users get): `vllm.LLM(model=DIR, enforce_eager=True)` with our plugin
  (molmo_vllm), prompts from `molmo_vllm.prompt.build_prompt` as the server builds them,
  greedy decoding; the exact image path as the server's default (`fast_preprocessing=True`:
  the fast path, uint8 crops normalized on the device);
- `reference`: molmo_model.generate on the PyTorch model, greedy, one query at a time.

Either engine answers with a LoRA adapter (molmo_model/lora.py) on the base: the reference
merges it into the weights (`merge_adapter`); vLLM loads it as an adapter (`enable_lora`,
a `LoRARequest` with every prompt), as the server does.

Metrics (paper, pointing evaluation):

- pointing: predicted points (`parse_points`) are matched one-to-one to the true objects with
  the Hungarian algorithm (`scipy.optimize.linear_sum_assignment`); a matched point is a hit
  when it lies inside its object's box. Per query precision = hits / predicted, recall =
  hits / true objects, F1 their harmonic mean; a "not present" query (no true object) scores
  1 when the answer has no point, else 0. Reported as the mean over queries, and micro-summed.
- counting: the number after "there are"/"there is" (else the number of points, 0 for "none")
  equals the true count; accuracy over queries with 1..10 objects (and over all).
- clocks: the first H:MM in the answer names the true hour (mod 12) and minute.

Two renderers draw the scenes (`molmo eval --renderer own|independent|both`, default both,
one engine): the training generator's held-out split (the report's top level), and
`training/independent_scenes.py`, written apart from it (supersampled, rotated shapes, HSV
colour ranges, outlines, light textures, 300-800 px sides; its report under "independent",
asked about the model's training vocabulary or `--kinds`/`--colours`). A model that scores
well on its own generator but not on the independent one learned the generator, not the task.

    molmo eval --model models/molmo-demo --engine vllm --examples 200 --out report.json
"""

from __future__ import annotations

import math
import os
import platform
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from molmo_model.lora import Adapter
from molmo_model.points import match_points, parse_count, parse_points, point_scores  # noqa: F401
from training.data.records import Example

COUNT_RANGE = (1, 10)  # counting accuracy is reported on queries with this many objects
_TIME_RE = re.compile(r"(\d{1,2}):(\d{2})")


@dataclass
class Query:
    """One question about one image, with the truth to score the answer against."""

    task: str  # "point", "count" or "clock"
    question: str
    image: Image.Image
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)  # true objects
    count: int | None = None
    time: tuple[int, int] | None = None  # (hour, minute)
    source: dict[str, Any] = field(default_factory=dict)  # split/index of the example

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.question}]


def queries_from_example(example: Example, tasks: Sequence[str] = ("point", "count", "clock")) -> list[Query]:
    """The scorable questions of one synthetic example (the answers are left out)."""
    meta = example.metadata
    source = {k: meta[k] for k in ("split", "index") if k in meta}
    objects = meta.get("objects", [])
    out = []
    for ann in example.annotations:
        if ann.task not in tasks:
            continue
        if ann.task in ("point", "count"):
            kind, colour = ann.info.get("kind"), ann.info.get("colour")
            boxes = [
                tuple(float(v) for v in o["box"])
                for o in objects
                if (kind is None or o["kind"] == kind) and (colour is None or o["colour"] == colour)
            ]
            out.append(Query(ann.task, ann.question, example.image, boxes, len(boxes), source=source))
        elif ann.task == "clock":
            time_ = (int(ann.info["hour"]), int(ann.info["minute"]))
            out.append(Query("clock", ann.question, example.image, time=time_, source=source))
    return out


# ---------------------------------------------------------------- metrics


def parse_time(text: str) -> tuple[int, int] | None:
    m = _TIME_RE.search(text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def score(queries: Sequence[Query], answers: Sequence[str]) -> dict[str, Any]:
    """The metrics of answers to queries (see the module docstring)."""
    if len(queries) != len(answers):
        raise ValueError(f"answers: {len(answers)} for {len(queries)} queries")
    pointing: list[dict[str, float]] = []
    n_pred = n_true = n_hits = 0
    counts: list[tuple[int, int]] = []
    clocks: list[tuple[tuple[int, int], tuple[int, int] | None]] = []
    for q, text in zip(queries, answers, strict=True):
        if q.task == "point":
            pts = [(p.x, p.y) for p in parse_points(text, q.image.width, q.image.height)]
            s = point_scores(pts, q.boxes)
            pointing.append({**s, "present": bool(q.boxes)})
            n_pred, n_true, n_hits = n_pred + len(pts), n_true + len(q.boxes), n_hits + s["hits"]
        elif q.task == "count":
            counts.append((q.count or 0, parse_count(text)))
        elif q.task == "clock":
            clocks.append((q.time, parse_time(text)))

    report: dict[str, Any] = {}
    if pointing:
        present = [s for s in pointing if s["present"]]
        absent = [s for s in pointing if not s["present"]]
        report["pointing"] = {
            "queries": len(pointing),
            "precision": mean_or_nan(s["precision"] for s in pointing),
            "recall": mean_or_nan(s["recall"] for s in pointing),
            "f1": mean_or_nan(s["f1"] for s in pointing),
            "f1_present": mean_or_nan(s["f1"] for s in present),
            "not_present_accuracy": mean_or_nan(s["f1"] for s in absent),
            "not_present_queries": len(absent),
            "micro_precision": n_hits / n_pred if n_pred else 0.0,
            "micro_recall": n_hits / n_true if n_true else 0.0,
        }
    if counts:
        lo, hi = COUNT_RANGE
        ranged = [(t, p) for t, p in counts if lo <= t <= hi]
        report["counting"] = {
            "queries": len(ranged),
            "accuracy": mean_or_nan(float(t == p) for t, p in ranged),
            "accuracy_all": mean_or_nan(float(t == p) for t, p in counts),
            "queries_all": len(counts),
            "mean_abs_error": mean_or_nan(abs(t - p) for t, p in ranged),
        }
    if clocks:
        report["clock"] = {
            "queries": len(clocks),
            "accuracy": mean_or_nan(
                float(p is not None and p[0] % 12 == t[0] % 12 and p[1] == t[1]) for t, p in clocks
            ),
            "hour_accuracy": mean_or_nan(float(p is not None and p[0] % 12 == t[0] % 12) for t, p in clocks),
        }
    return report


def mean_or_nan(values) -> float:
    """The mean of `values`, NaN when there are none (a metric with no queries)."""
    values = list(values)
    return float(sum(values) / len(values)) if values else math.nan


# ---------------------------------------------------------------- engines


class ReferenceEngine:
    """Greedy answers from the PyTorch model (molmo_model.generate), one query at a time."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 256) -> None:
        from molmo_model.preprocessing import MolmoPreprocessor

        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.preprocessor = MolmoPreprocessor(model.config.preprocess, tokenizer)

    @classmethod
    def from_dir(cls, model_dir: str | Path, max_new_tokens: int = 256, adapter: Adapter | None = None) -> ReferenceEngine:
        """The checkpoint in `model_dir`, with `adapter` (read_adapter's) merged into it."""
        from molmo_model.checkpoint import load_checkpoint
        from molmo_model.lora import merge_adapter

        model, _, tokenizer = load_checkpoint(model_dir)
        if adapter is not None:
            merge_adapter(model, adapter)
        return cls(model.eval(), tokenizer, max_new_tokens)

    def answer(self, queries: Sequence[Query]) -> list[str]:
        from molmo_model.generate import generate

        out = []
        for q in queries:
            ids, images = self.preprocessor.build_prompt(q.messages, [q.image])
            result = generate(self.model, ids, images, self.max_new_tokens, eos_id=self.tokenizer.eos_id)
            tokens = [t for t in result.tokens if t != self.tokenizer.eos_id]
            out.append(self.tokenizer.decode(tokens))
        return out


class VllmEngine:
    """Greedy answers from vLLM with our Molmo plugin: what the server runs."""

    def __init__(
        self,
        model_dir: str | Path,
        max_new_tokens: int = 256,
        max_model_len: int = 2048,
        dtype: str = "auto",
        fast_preprocessing: bool = False,
        adapter: Adapter | None = None,
    ) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM, SamplingParams

        from molmo_model.tokenizer import MolmoTokenizer
        from molmo_vllm import register

        register()  # fails early when the plugin is broken

        self.tokenizer = MolmoTokenizer.from_dir(model_dir)
        lora: dict[str, Any] = {}
        self.lora_request = None
        if adapter is not None:
            from vllm.lora.request import LoRARequest

            lora = {"enable_lora": True, "max_loras": 1, "max_lora_rank": vllm_lora_rank(adapter.config.rank)}
            self.lora_request = LoRARequest("adapter", 1, str(adapter.path))
        self.llm = LLM(
            model=str(model_dir),
            enforce_eager=True,
            max_model_len=max_model_len,
            limit_mm_per_prompt={"image": 1},
            seed=0,
            dtype=dtype,
            mm_device_do_normalize=fast_preprocessing,  # README: "Image preprocessing"
            **lora,
        )
        self.params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)

    def answer(self, queries: Sequence[Query]) -> list[str]:
        from molmo_vllm.prompt import build_prompt

        prompts = [build_prompt(self.tokenizer, q.messages, [q.image]) for q in queries]
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False, lora_request=self.lora_request)
        return [o.outputs[0].text for o in outputs]


def vllm_lora_rank(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM takes (a fixed list of values) that holds `rank`."""
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    fits = [r for r in get_args(MaxLoRARanks) if r >= rank]
    if not fits:
        raise ValueError(f"LoRA rank {rank} is over vLLM's largest max_lora_rank {max(get_args(MaxLoRARanks))}")
    return min(fits)


def held_out_queries(
    n_examples: int,
    synthetic,
    split: str = "test",
    start: int = 0,
    tasks: Sequence[str] = ("point", "count", "clock"),
) -> list[Query]:
    """Queries of synthetic examples start..start+n-1 of `split` (a SyntheticConfig)."""
    from training.data.synthetic import SyntheticDataset

    data = SyntheticDataset(split, n_examples, synthetic, start=start)
    return [q for i in range(len(data)) for q in queries_from_example(data[i], tasks)]


def run_eval(engine, queries: Sequence[Query], with_answers: bool = False) -> dict[str, Any]:
    """Answers `queries` with `engine` and scores them; adds timing and the machine."""
    t0 = time.perf_counter()
    answers = engine.answer(queries)
    elapsed = time.perf_counter() - t0
    report = score(queries, answers)
    report["seconds"] = elapsed
    report["machine"] = {"platform": platform.platform(), "processor": platform.processor(),
                         "cpus": os.cpu_count()}  # fmt: skip
    if with_answers:
        report["answers"] = [
            {"task": q.task, "question": q.question, "answer": a, **q.source,
             "image_size": list(q.image.size), "count": q.count, "boxes": [list(b) for b in q.boxes]}
            for q, a in zip(queries, answers, strict=True)
        ]  # fmt: skip
    return report
