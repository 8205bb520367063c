"""The JSONL format for your own training images, its reader and its writer.

Every dataset yields `training.records.Example`: one RGB PIL image, the list of its
`Annotation`s (chats about the image; all of them are packed into one training sequence,
Molmo's multi-annotation training), and a metadata dict.

JSONL format
============

One JSON object per line, one line per image (blank lines are skipped):

    {"image": "images/kitchen.jpg",
     "annotations": [
       {"messages": [{"role": "user", "content": "What is on the table?"},
                     {"role": "assistant", "content": "Two mugs and a teapot."}]},
       {"messages": [{"role": "user", "content": "Point to the mugs."}],
        "points": [[412.0, 300.5], [188.0, 296.0]], "label": "mugs"},
       {"messages": [{"role": "user", "content": "Point to the cat."}],
        "points": [], "label": "cat"}
     ],
     "metadata": {"source": "my-photos"}}

(written over several lines here for reading; in the file each object is on one line.)

A line's fields:

- `image` (required, string): the image file. A relative path is relative to the folder of
  the JSONL file. Any format Pillow reads; loaded by `molmo_model.images.load_image` (EXIF
  rotation applied, converted to RGB, transparency composited on white).
- `annotations` (required, non-empty list): the chats about this image, below.
- `metadata` (optional, object): anything JSON; handed through untouched as
  `Example.metadata` (the synthetic splits keep every object, or the clock geometry, here).

An annotation's fields:

- `messages` (required, non-empty list of `{"role": ..., "content": ...}`): roles alternate
  `"user"`, `"assistant"`, starting with `"user"`; each content a non-empty string. The
  assistant turns are the training targets. The prompt template (`" User: ... Assistant:"`)
  is added by the preprocessor; do not write it here.
- `points` (optional, list of `[x, y]`): points in pixels of the image (origin top-left,
  x right, y down), e.g. object centres. If `messages` ends with a user turn, the missing
  answer is built from the points with `molmo_model.points.format_points`: Molmo v1 point
  tags with percentages, ordered top-down then left-right; `[]` gives "There are none.".
  If the answer is written out, the points are kept as they are (for evaluation).
- `label` (string; required when the answer is built from points): what the points are,
  e.g. "mugs"; it becomes the tag's alt and inner text.
- `task` (optional, string) and `info` (optional, object): free tags for mixing and
  evaluation ("point", "count", "caption", "clock", ...).

Unknown fields are errors, since they are usually typos. A bad line raises ValueError
naming the file, the line number and the field, e.g.
`data.jsonl:7: annotations[0].messages[1].role: must be "user" or "assistant", got "bot"`.

`JsonlDataset(path)` reads such a file; `write_jsonl(examples, out_dir)` writes examples in
this format (PNG images). A synthetic split written this way (`python -m training.data OUT_DIR
--split train --size 1000`, training/data/synthetic/) also goes through `JsonlDataset`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from molmo_model.images import ImageError, load_image
from molmo_model.points import format_points
from training.data.records import ROLES, Annotation, Example

LINE_FIELDS = ("image", "annotations", "metadata")
ANNOTATION_FIELDS = ("messages", "points", "label", "task", "info")


@dataclass
class JsonlRecord:
    """One validated line: the image is not opened until the dataset item is read."""

    source: str  # the JSONL file, for error messages
    line: int  # 1-based line number
    image_path: Path
    # An annotation may still end with a user turn; its answer is built from its points
    # once the image size is known.
    annotations: list[Annotation]
    metadata: dict[str, Any] = field(default_factory=dict)


Fail = Callable[[str, str], ValueError]  # (field, problem) -> the error to raise


def _error(source: str, line: int, problem: str, name: str | None = None) -> ValueError:
    where = f"{source}:{line}"
    return ValueError(f"{where}: {name}: {problem}" if name else f"{where}: {problem}")


def _check_fields(obj: dict[str, Any], allowed: tuple[str, ...], prefix: str, fail: Fail) -> None:
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise fail(prefix + unknown[0], f"unknown field; allowed: {', '.join(allowed)}")


def _parse_points(value: Any, name: str, fail: Fail) -> list[tuple[float, float]]:
    if not isinstance(value, list):
        raise fail(name, f"must be a list of [x, y] pairs in pixels, got {type(value).__name__}")
    points = []
    for j, p in enumerate(value):
        ok = isinstance(p, list) and len(p) == 2
        ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p)
        if not ok or not all(math.isfinite(v) and v >= 0 for v in p):
            raise fail(
                f"{name}[{j}]", f"must be [x, y] with non-negative numbers, got {json.dumps(p)}"
            )
        points.append((float(p[0]), float(p[1])))
    return points


def _parse_annotation(raw: Any, name: str, fail: Fail) -> Annotation:
    if not isinstance(raw, dict):
        raise fail(name, f"must be an object, got {type(raw).__name__}")
    _check_fields(raw, ANNOTATION_FIELDS, f"{name}.", fail)
    if "messages" not in raw:
        raise fail(f"{name}.messages", "is required")
    messages = raw["messages"]
    if not isinstance(messages, list) or not messages:
        raise fail(f"{name}.messages", "must be a non-empty list of {role, content} objects")
    for k, m in enumerate(messages):
        where = f"{name}.messages[{k}]"
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise fail(where, 'must be an object with exactly "role" and "content"')
        expected = ROLES[k % 2]
        if m["role"] not in ROLES:
            raise fail(
                f"{where}.role", f'must be "user" or "assistant", got {json.dumps(m["role"])}'
            )
        if m["role"] != expected:
            raise fail(
                f"{where}.role",
                f"turns must alternate starting with user; expected {expected!r} here",
            )
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise fail(f"{where}.content", "must be a non-empty string")

    points = _parse_points(raw["points"], f"{name}.points", fail) if "points" in raw else None
    label = raw.get("label")
    if label is not None and (not isinstance(label, str) or not label.strip()):
        raise fail(f"{name}.label", "must be a non-empty string")
    if messages[-1]["role"] == "user":
        if points is None:
            raise fail(
                f"{name}.messages",
                "ends with a user turn: add the assistant's answer, or `points` and `label` to build it from",
            )
        if label is None:
            raise fail(f"{name}.label", "is required to build the answer from `points`")
    task = raw.get("task")
    if task is not None and not isinstance(task, str):
        raise fail(f"{name}.task", "must be a string")
    info = raw.get("info", {})
    if not isinstance(info, dict):
        raise fail(f"{name}.info", "must be an object")
    return Annotation([dict(m) for m in messages], points, label, task, info)


def parse_line(text: str, line: int, base_dir: Path, source: str = "<jsonl>") -> JsonlRecord:
    """Validate one JSONL line (1-based `line`); relative image paths resolve against `base_dir`."""

    def fail(name: str, problem: str) -> ValueError:
        return _error(source, line, problem, name)

    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise _error(source, line, f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise _error(source, line, f"must be a JSON object, got {type(obj).__name__}")
    _check_fields(obj, LINE_FIELDS, "", fail)
    image = obj.get("image")
    if not isinstance(image, str) or not image.strip():
        raise fail("image", "is required: a path to the image file")
    path = Path(image) if Path(image).is_absolute() else base_dir / image
    annotations = obj.get("annotations")
    if not isinstance(annotations, list) or not annotations:
        raise fail("annotations", "is required: a non-empty list of annotations")
    parsed = [_parse_annotation(a, f"annotations[{i}]", fail) for i, a in enumerate(annotations)]
    metadata = obj.get("metadata", {})
    if not isinstance(metadata, dict):
        raise fail("metadata", "must be an object")
    return JsonlRecord(source, line, path, parsed, metadata)


def read_jsonl(path: str | Path, check_images: bool = True) -> list[JsonlRecord]:
    """Validate every line of a JSONL file (and, by default, that each image file exists)."""
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            record = parse_line(text, line, path.parent, source=str(path))
            if check_images and not record.image_path.is_file():
                raise _error(str(path), line, f"file not found: {record.image_path}", "image")
            records.append(record)
    return records


def load_record(record: JsonlRecord) -> Example:
    """Open the image of a validated record and build any answers from points."""
    try:
        image = load_image(record.image_path)
    except ImageError as e:
        raise _error(record.source, record.line, str(e), "image") from None
    width, height = image.size
    annotations = []
    for i, ann in enumerate(record.annotations):
        for j, (x, y) in enumerate(ann.points or []):
            if x > width or y > height:
                problem = f"[{x:g}, {y:g}] is outside the {width}x{height} image"
                name = f"annotations[{i}].points[{j}]"
                raise _error(record.source, record.line, problem, name)
        messages = [dict(m) for m in ann.messages]
        if messages[-1]["role"] == "user":
            assert ann.points is not None and ann.label is not None  # checked by parse_line
            answer = format_points(ann.points, ann.label, width=width, height=height)
            messages.append({"role": "assistant", "content": answer})
        points = list(ann.points) if ann.points is not None else None
        annotations.append(Annotation(messages, points, ann.label, ann.task, dict(ann.info)))
    return Example(image, annotations, dict(record.metadata))


class JsonlDataset(Dataset):
    """Examples from a JSONL file (format in the module docstring); validated up front."""

    def __init__(self, path: str | Path, check_images: bool = True) -> None:
        self.path = Path(path)
        self.records = read_jsonl(self.path, check_images=check_images)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Example:
        return load_record(self.records[index])


def write_jsonl(examples: Iterable[Example], out_dir: str | Path, name: str = "data") -> Path:
    """Write examples as `out_dir/name.jsonl` with PNG images under `out_dir/images/`."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i, example in enumerate(examples):
            image_name = f"images/{name}_{i:06d}.png"
            example.image.save(out / image_name, format="PNG")
            line = {"image": image_name, "annotations": [a.to_dict() for a in example.annotations]}
            if example.metadata:
                line["metadata"] = example.metadata
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return path
