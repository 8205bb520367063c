"""What a benchmark sends: samples of (image, question) with the truth to score answers by.

Three sources, chosen by `--dataset`:

- `synthetic`: scenes of coloured circles and squares drawn from a seed, at `--image-size`;
  each image is asked pointing and counting questions whose truth (object boxes, count) is
  known, so pointing F1 and counting accuracy can be measured under load.
- a folder: every image in it (sorted), one question for all (`--question` / `--object`),
  no truth.
- a JSONL file, one row per question:
  `{"image": "a.png", "question": "Point to the dogs.", "object": "dogs",
    "boxes": [[x0, y0, x1, y1], ...], "points": [[x, y], ...], "count": 3}`;
  `image` is relative to the file; every field but `image` is optional (`question` defaults
  to "Point to all the {object}."). Expected `points` count as boxes of +-`point_radius`
  pixels (default 16) around them, so they are matched as `molmo eval` matches objects.

`--questions-per-image K` asks K questions of each image back to back: the first is marked
`first_of_image`, so the report can split first-question TTFT (image encoded) from later ones
(served from the prefix cache by a vLLM engine).
"""

from __future__ import annotations

import base64
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
COLOURS = {"red": (220, 30, 35), "green": (30, 165, 60), "blue": (30, 80, 225), "yellow": (240, 215, 0)}
DEFAULT_POINT_RADIUS = 16.0


class DatasetError(ValueError):
    """A dataset that cannot be read; the message names the file and the problem."""


@dataclass
class Sample:
    """One request's content and, where known, the truth to score its answer against."""

    image_id: str
    image_url: str  # a data: URL
    width: int
    height: int
    question: str  # for the chat endpoint
    object: str  # for the point endpoint ("red circles")
    task: str | None = None  # "point" or "count" when the truth below applies
    boxes: list[list[float]] | None = None  # true objects, pixels (x0, y0, x1, y1)
    count: int | None = None
    first_of_image: bool = True
    meta: dict[str, Any] = field(default_factory=dict)


def encode_png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def parse_size(text: str) -> tuple[int, int]:
    """'640x480' -> (640, 480); a ValueError names the flag otherwise."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--image-size: expected WxH such as 640x480, got {text!r}") from None
    if not (16 <= w <= 8192 and 16 <= h <= 8192):
        raise ValueError(f"--image-size: each side must be in 16..8192, got {text!r}")
    return w, h


# ---------------------------------------------------------------- synthetic


def synthetic_scene(seed: int, size: tuple[int, int]) -> tuple[Image.Image, dict[str, list[list[float]]]]:
    """A light background with 0-5 objects of each (colour, shape) picked; returns the image
    and {"red circles": [box, ...], ...} for every label drawn (boxes in pixels)."""
    rng = random.Random(seed)
    w, h = size
    image = Image.new("RGB", size, (235, 235, 225))
    draw = ImageDraw.Draw(image)
    cell = max(16, min(w, h) // 5)  # a grid of cells, one object per cell: no overlaps
    cells = [(x, y) for x in range(0, w - cell + 1, cell) for y in range(0, h - cell + 1, cell)]
    rng.shuffle(cells)
    labels: dict[str, list[list[float]]] = {}
    for colour, shape in rng.sample([(c, s) for c in COLOURS for s in ("circle", "square")], 2):
        boxes = labels.setdefault(f"{colour} {shape}s", [])
        for _ in range(rng.randint(0, 5)):
            if not cells:
                break
            x, y = cells.pop()
            r = rng.uniform(0.25, 0.4) * cell
            cx, cy = x + cell / 2, y + cell / 2
            box = [cx - r, cy - r, cx + r, cy + r]
            (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
            boxes.append([round(v, 2) for v in box])
    return image, labels


def synthetic_samples(n_images: int, size: tuple[int, int], seed: int, per_image: int) -> list[Sample]:
    """`n_images` scenes, `per_image` questions each (pointing and counting, alternating)."""
    samples = []
    for i in range(n_images):
        image, labels = synthetic_scene(seed * 100_003 + i, size)
        url = encode_png(image)
        names = sorted(labels)
        for k in range(per_image):
            label = names[(k // 2) % len(names)]
            boxes = labels[label]
            task = "point" if k % 2 == 0 else "count"
            question = f"Point to all the {label}." if task == "point" else f"How many {label} are there?"
            samples.append(
                Sample(f"synthetic-{seed}-{i}", url, size[0], size[1], question, label, task,
                       boxes, len(boxes), first_of_image=k == 0)
            )  # fmt: skip
    return samples


# ---------------------------------------------------------------- files


def _load_image(path: Path, where: str) -> tuple[str, int, int]:
    try:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
    except FileNotFoundError:
        raise DatasetError(f"{where}: image not found: {path}") from None
    except OSError as e:
        raise DatasetError(f"{where}: not a readable image: {path} ({e})") from None
    return encode_png(rgb), rgb.width, rgb.height


def folder_samples(folder: Path, question: str, obj: str, per_image: int) -> list[Sample]:
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DatasetError(f"--dataset {folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in it")
    samples = []
    for p in paths:
        url, w, h = _load_image(p, f"--dataset {folder}")
        for k in range(per_image):
            samples.append(Sample(p.name, url, w, h, question, obj, first_of_image=k == 0))
    return samples


def _boxes_of(row: dict[str, Any], where: str) -> list[list[float]] | None:
    radius = float(row.get("point_radius", DEFAULT_POINT_RADIUS))
    boxes = None
    try:
        if row.get("boxes") is not None:
            boxes = [[float(v) for v in b] for b in row["boxes"]]
            if any(len(b) != 4 for b in boxes):
                raise ValueError
        if row.get("points") is not None:
            pts = [[float(v) for v in p] for p in row["points"]]
            if any(len(p) != 2 for p in pts):
                raise ValueError
            boxes = (boxes or []) + [[x - radius, y - radius, x + radius, y + radius] for x, y in pts]
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: 'boxes' must be [[x0, y0, x1, y1], ...] and 'points' [[x, y], ...]") from None
    return boxes


def jsonl_samples(path: Path, per_image: int) -> list[Sample]:
    samples = []
    images: dict[str, tuple[str, int, int]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("image"), str):
            raise DatasetError(f"{where}: a row needs \"image\": a path relative to the file")
        obj = str(row.get("object") or "")
        question = row.get("question") or (f"Point to all the {obj}." if obj else None)
        if not question:
            raise DatasetError(f"{where}: a row needs \"question\" or \"object\"")
        if row["image"] not in images:
            images[row["image"]] = _load_image(path.parent / row["image"], where)
        url, w, h = images[row["image"]]
        boxes = _boxes_of(row, where)
        count = row.get("count")
        if count is not None and (not isinstance(count, int) or count < 0):
            raise DatasetError(f"{where}: 'count' must be a non-negative integer")
        task = "point" if boxes is not None else ("count" if count is not None else None)
        for k in range(per_image):
            samples.append(Sample(row["image"], url, w, h, question, obj or question, task,
                                  boxes, count if count is not None else (len(boxes) if boxes else None),
                                  first_of_image=k == 0))  # fmt: skip
    if not samples:
        raise DatasetError(f"--dataset {path}: no rows")
    return samples


def load_dataset(
    spec: str,
    *,
    num_images: int,
    image_size: tuple[int, int] = (640, 480),
    seed: int = 0,
    questions_per_image: int = 1,
    question: str = "Point to all the red circles.",
    obj: str = "red circles",
) -> list[Sample]:
    """Samples of `spec` ("synthetic", a folder or a .jsonl file), image-major."""
    if questions_per_image < 1:
        raise ValueError("--questions-per-image must be >= 1")
    if spec == "synthetic":
        return synthetic_samples(max(1, num_images), image_size, seed, questions_per_image)
    path = Path(spec)
    if path.is_dir():
        return folder_samples(path, question, obj, questions_per_image)
    if path.is_file():
        return jsonl_samples(path, questions_per_image)
    raise DatasetError(f"--dataset: {spec!r} is neither 'synthetic', a folder nor a JSONL file")
