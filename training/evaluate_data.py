"""Evaluation on your own held-out JSONL data: pointing, counting and short answers.

    molmo eval --model runs/mine/model --data val.jsonl [--engine vllm|reference]

Every annotation of the file (format: training/data/jsonl.py) is one query: its messages up
to the last user turn are the prompt, asked through an engine of training/evaluate.py
(`vllm`, what the server runs, or the PyTorch `reference`), greedily. What is scored depends
on what the annotation holds:

- `points` (pixels): **pointing** and **counting**. The answer's points (`parse_points`, in
  pixels) are matched one-to-one to the true points by distance (the Hungarian algorithm,
  `scipy.optimize.linear_sum_assignment` on Euclidean distances); a matched pair is a hit
  when the two are at most `threshold` x the image diagonal apart (default 0.05, i.e. 5% of
  the diagonal: `--point-threshold`). Precision = hits / predicted, recall = hits / true,
  F1 their harmonic mean; an annotation with `points: []` scores 1 when the answer has no
  point, else 0. Reported as the mean over queries and micro-summed. The true count is the
  number of points; the answer's count is the number it states ("there are N"), else its
  number of points: accuracy and mean absolute error.
- no points and a written answer of at most `SHORT_WORDS` words: **exact match** after
  normalising both (lower case, punctuation and repeated spaces removed).
- longer written answers (captions): not scored; counted as `unscored`.
"""

from __future__ import annotations

import math
import re
import string
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy.optimize import linear_sum_assignment

from molmo_model.points import parse_count, parse_points, scores_from_hits
from training.data.jsonl import load_record, read_jsonl
from training.evaluate import mean_or_nan

POINT_THRESHOLD = 0.05  # a hit: within this fraction of the image diagonal of its true point
SHORT_WORDS = 5  # written answers up to this many words are scored by exact match


@dataclass
class DataQuery:
    """One annotation of a JSONL file as a question, with the truth it is scored against."""

    messages: list[dict[str, str]]  # the prompt: the chat up to its last user turn
    image: Image.Image
    answer: str  # the reference answer (written out, or built from the points)
    points: list[tuple[float, float]] | None  # true points in pixels, when the annotation has them
    where: str  # "file:line annotations[i]"

    @property
    def question(self) -> str:
        return self.messages[-1]["content"]

    @property
    def kind(self) -> str:
        """"point", "short" (exact match) or "long" (not scored)."""
        if self.points is not None:
            return "point"
        return "short" if len(self.answer.split()) <= SHORT_WORDS else "long"


def data_queries(path: str | Path, limit: int | None = None) -> list[DataQuery]:
    """The queries of a JSONL file, in file order (the first `limit` of them)."""
    out: list[DataQuery] = []
    for record in read_jsonl(path):
        example = load_record(record)
        for i, ann in enumerate(example.annotations):
            out.append(DataQuery([dict(m) for m in ann.messages[:-1]], example.image, ann.answer,
                                 ann.points, f"{Path(record.source).name}:{record.line} annotations[{i}]"))  # fmt: skip
            if limit is not None and len(out) >= limit:
                return out
    return out


def match_by_distance(
    predicted: Sequence[tuple[float, float]], truth: Sequence[tuple[float, float]], radius: float
) -> int:
    """Hits of the one-to-one matching that minimises the total distance: matched pairs at
    most `radius` apart."""
    if not predicted or not truth:
        return 0
    p, t = np.asarray(predicted, dtype=np.float64), np.asarray(truth, dtype=np.float64)  # [P, 2], [T, 2]
    dist = np.linalg.norm(p[:, None, :] - t[None, :, :], axis=-1)  # [P, T]
    # Pairs too far apart cost the same: the matching then maximises the pairs within reach.
    cost = np.where(dist <= radius, dist, radius * 1e3)
    rows, cols = linear_sum_assignment(cost)
    return int(sum(dist[r, c] <= radius for r, c in zip(rows, cols, strict=True)))


def normalize_answer(text: str) -> str:
    """Lower case, without punctuation and repeated spaces: what exact match compares."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def score_data(queries: Sequence[DataQuery], answers: Sequence[str], threshold: float = POINT_THRESHOLD) -> dict[str, Any]:
    """The metrics of answers to data queries (see the module docstring)."""
    if len(queries) != len(answers):
        raise ValueError(f"answers: {len(answers)} for {len(queries)} queries")
    pointing, counts, exact, per_query = [], [], [], []
    n_pred = n_true = n_hits = unscored = 0
    for q, text in zip(queries, answers, strict=True):
        row: dict[str, Any] = {"where": q.where, "question": q.question, "answer": text, "reference": q.answer}
        if q.kind == "point":
            width, height = q.image.size
            pts = [(p.x, p.y) for p in parse_points(text, width, height)]
            truth = list(q.points or [])
            hits = match_by_distance(pts, truth, threshold * math.hypot(width, height)) if truth else 0
            s = scores_from_hits(hits, len(pts), len(truth))
            f1 = s["f1"]
            pointing.append((s["precision"], s["recall"], f1, bool(truth)))
            n_pred, n_true, n_hits = n_pred + len(pts), n_true + len(truth), n_hits + hits
            counts.append((len(truth), parse_count(text)))
            row.update(f1=f1, count=counts[-1][1], true_count=len(truth))
        elif q.kind == "short":
            exact.append(normalize_answer(text) == normalize_answer(q.answer))
            row["exact"] = exact[-1]
        else:
            unscored += 1
        per_query.append(row)
    report: dict[str, Any] = {"queries": len(queries), "unscored": unscored}
    if pointing:
        report["pointing"] = {
            "queries": len(pointing),
            "threshold": f"{threshold:g} x image diagonal",
            "precision": mean_or_nan(s[0] for s in pointing),
            "recall": mean_or_nan(s[1] for s in pointing),
            "f1": mean_or_nan(s[2] for s in pointing),
            "not_present_accuracy": mean_or_nan(s[2] for s in pointing if not s[3]),
            "micro_precision": n_hits / n_pred if n_pred else 0.0,
            "micro_recall": n_hits / n_true if n_true else 0.0,
        }
        report["counting"] = {
            "queries": len(counts),
            "accuracy": mean_or_nan(float(t == p) for t, p in counts),
            "mean_abs_error": mean_or_nan(abs(t - p) for t, p in counts),
        }
    if exact:
        report["exact_match"] = {"queries": len(exact), "accuracy": mean_or_nan(float(e) for e in exact)}
    report["per_query"] = per_query
    return report


def run_data_eval(engine, queries: Sequence[DataQuery], threshold: float = POINT_THRESHOLD) -> dict[str, Any]:
    """Answers `queries` with `engine` (training/evaluate.py) and scores them."""
    t0 = time.perf_counter()
    answers = engine.answer(queries)
    report = score_data(queries, answers, threshold)
    report["seconds"] = time.perf_counter() - t0
    return report


def format_table(report: dict[str, Any]) -> str:
    """The report's metrics as a small table."""
    rows = [("metric", "queries", "value")]
    for section, keys in (("pointing", ("precision", "recall", "f1")),
                          ("counting", ("accuracy", "mean_abs_error")), ("exact_match", ("accuracy",))):  # fmt: skip
        if section in report:
            for key in keys:
                rows.append((f"{section} {key}", str(report[section]["queries"]), f"{report[section][key]:.3f}"))
    if report.get("unscored"):
        rows.append(("unscored (long answers)", str(report["unscored"]), "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)

