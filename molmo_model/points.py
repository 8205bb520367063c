"""Pointing outputs: read Molmo's point tags out of generated text, and write v1 targets.

Two formats are read, in any mix, by `parse_points`:

- Molmo v1 (Molmo-7B-D and friends): coordinates are percentages (0-100) of the image width
  and height. One point `<point x="61.5" y="40.2" alt="a dog">a dog</point>`; several,
  numbered, `<points x1="10.0" y1="12.5" x2="20.0" y2="30.1" alt="dogs">dogs</points>`.
- Molmo 2: `<points alt="dogs" coords="1 1 900 400 2 911 800">dogs</points>` and, for video,
  `<tracks coords="...">`. `coords` is a list of groups separated by a tab (Ai2's reader also
  splits on `,` `;` `:`); each group is `HEAD id x y [id x y ...]` with x, y on a 0-1000
  scale. HEAD is the 1-based image index for `<points>`; for `<tracks>` (and for `<points>`
  whose HEAD has a decimal point, as in video pointing) it is the frame's time in seconds.

`format_points` writes the v1 target text Molmo is trained on; `parse_points` reads it back.

    >>> parse_points('<point x="50.0" y="25.0" alt="a cat">a cat</point>', 640, 480)[0].x
    320.0

The parser never raises on the text, whatever it holds: a malformed tag or value is skipped.
Its regexes are linear in the text length (no nested quantifiers, no quoted value may cross
a `<`), so megabytes of adversarial model output parse quickly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

NOT_PRESENT = "There are none."  # what format_points writes when there is nothing to point at

# An opening tag. The body is a run of plain characters and quoted values; a quoted value may
# hold `>` but not `<`, which bounds every match attempt by the next `<` (linear overall).
_TAG = re.compile(r"""<(points?|tracks)\b((?:[^<>"']|"[^"<]*"|'[^'<]*')*)>""")
# name=value inside a tag body. The look-behind stops a match from starting in the middle of a
# name, which would make a long run of word characters quadratic.
_ATTR = re.compile(
    r"""(?<![\w.:-])([A-Za-z_][\w.:-]*)\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'<>=]+))"""
)
_CLOSE = re.compile(r"([^<]*)</(points?|tracks)\s*>")
_OPEN = re.compile(r"<(points?|tracks)\b")  # the start of an opening tag, complete or not
# The closed part of a tag body: plain characters and closed quoted values. In a tag cut off by
# the end of the text, what follows it is an unclosed quoted value (or nothing).
_CLOSED_PART = re.compile(r"""(?:[^"']|"[^"]*"|'[^']*')*""")
_CUT_COORDS = re.compile(r"""(?<![\w.:-])coords\s*=\s*\Z""")
_V1_KEY = re.compile(r"([xy])(\d{0,6})")
_NUMBER = re.compile(r"\d{1,12}(?:\.\d{0,12})?|\.\d{1,12}")  # no sign, no exponent, no nan/inf
_INT = re.compile(r"\d{1,9}")
_COORDS_SEP = re.compile(r"[\t:;,]")
_ENTITY = re.compile(r"&(quot|lt|gt|amp);")
_ENTITIES = {"quot": '"', "lt": "<", "gt": ">", "amp": "&"}
_AMP_BEFORE_ENTITY = re.compile(r"&(?=(?:quot|lt|gt|amp);)")


@dataclass
class Point:
    """One point. `x`, `y` are pixels when the image size is known, else None."""

    x: float | None
    y: float | None
    x_norm: float  # 0-1, fraction of the image width
    y_norm: float  # 0-1, fraction of the image height
    label: str | None = None  # the tag's alt text, else its inner text
    image_index: int = 0  # 0-based image (or, for video, frame ordinal by time)
    point_id: int | None = None  # Molmo 2 object id (the same object across frames of a track)
    time: float | None = None  # Molmo 2 video: the frame's time in seconds

    def as_dict(self) -> dict[str, float | int | str | None]:
        return asdict(self)


# ---------------------------------------------------------------- parsing


def _number(value: str, limit: float) -> float | None:
    """A plain decimal in [0, limit], else None (negative, huge, nan, inf and words are out)."""
    value = value.strip()
    if not _NUMBER.fullmatch(value):
        return None
    v = float(value)
    return v if v <= limit else None


def _unescape(s: str) -> str:
    return _ENTITY.sub(lambda m: _ENTITIES[m.group(1)], s)


def _attributes(body: str) -> dict[str, str]:
    attrs: dict[str, str] = {}
    for m in _ATTR.finditer(body):
        value = m.group(2) if m.group(2) is not None else m.group(3)
        attrs.setdefault(m.group(1), value if value is not None else m.group(4))
    return attrs


def _v1_points(attrs: dict[str, str], label: str | None) -> list[Point]:
    pairs: dict[str, dict[str, float]] = {}
    for key, value in attrs.items():
        m = _V1_KEY.fullmatch(key)
        v = _number(value, 100.0) if m else None
        if m and v is not None:
            pairs.setdefault(m.group(2), {})[m.group(1)] = v / 100.0
    order = sorted(pairs, key=lambda s: (s != "", int(s) if s else 0))
    return [
        Point(None, None, pairs[s]["x"], pairs[s]["y"], label)
        for s in order
        if "x" in pairs[s] and "y" in pairs[s]
    ]


def _coords_points(coords: str, label: str | None, video: bool) -> list[Point]:
    out: list[Point] = []
    for group in _COORDS_SEP.split(coords):
        tokens = group.split()
        if not tokens:
            continue
        head, rest = tokens[0], tokens[1:]
        image_index, time = 0, None
        if video or "." in head:
            time = _number(head, math.inf)
            if time is None:
                continue
        elif _INT.fullmatch(head) and int(head) >= 1:
            image_index = int(head) - 1
        else:
            continue
        for i in range(0, len(rest) - len(rest) % 3, 3):
            pid, xs, ys = rest[i : i + 3]
            x, y = _number(xs, 1000.0), _number(ys, 1000.0)
            if x is None or y is None or not _INT.fullmatch(pid):
                continue
            out.append(
                Point(None, None, x / 1000.0, y / 1000.0, label, image_index, int(pid), time)
            )
    return out


def _sizes(value: object, name: str) -> float | list[float] | None:
    """A single size (for every image), a list of sizes (one per image), or None."""
    if value is None:
        return None
    scalar = isinstance(value, (int, float, str))
    try:
        items = [value] if scalar else list(value)  # type: ignore[call-overload]
    except TypeError:
        items, scalar = [value], True  # a scalar of another type (numpy, torch)
    sizes: list[float] = []
    for v in items:
        try:
            f = float(v)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(
                f"{name} must be a number or a sequence of numbers, got {v!r}"
            ) from None
        if isinstance(v, bool) or not math.isfinite(f) or f <= 0:
            raise ValueError(f"{name} must be positive and finite, got {v!r}")
        sizes.append(f)
    if not sizes:
        raise ValueError(f"{name} must not be an empty sequence")
    return sizes[0] if scalar else sizes


def _size_for(sizes: float | list[float], index: int) -> float | None:
    if isinstance(sizes, float):
        return sizes
    return sizes[index] if index < len(sizes) else None


def _drop_cut_token(s: str) -> str:
    """`s` without its last token when nothing separates that token from the end of the text:
    the cut may have shortened it (`x3=4` of `x3=45.5`, `8` of `800`)."""
    i = len(s)
    while i and not (s[i - 1].isspace() or s[i - 1] in "\"':;,"):
        i -= 1
    return s[:i]


def _cut_off_tag(text: str, pos: int) -> list[Point]:
    """The complete points of an opening tag that starts at or after `pos` and that the end
    of `text` cuts off before its `>`."""
    start = text.rfind("<")
    if start < pos or not (tag := _OPEN.match(text, start)) or _TAG.match(text, start):
        return []
    body = text[tag.end() :]
    closed = _CLOSED_PART.match(body).group()  # type: ignore[union-attr]  # matches always
    cut_value = body[len(closed) + 1 :] if len(closed) < len(body) else None
    attrs = _attributes(_drop_cut_token(closed))
    if cut_value is not None and _CUT_COORDS.search(closed):
        attrs.setdefault("coords", _drop_cut_token(cut_value))
    label = _unescape(attrs["alt"]) if attrs.get("alt") else None
    if "coords" in attrs:
        return _coords_points(attrs["coords"], label, video=tag.group(1) == "tracks")
    return _v1_points(attrs, label)


def parse_points(
    text: str,
    width: float | Sequence[float] | None = None,
    height: float | Sequence[float] | None = None,
) -> list[Point]:
    """Every point in `text`, in the order written.

    `width`/`height` (both or neither) give pixel coordinates: one number for every image, or
    one per image (indexed by `image_index`; a point beyond the list gets x = y = None).
    Values outside the format's range (over 100 in v1, over 1000 in Molmo 2, negative, not a
    plain number) drop their point, as does a pair missing a coordinate. The closing tag is
    optional. An opening tag cut off by the end of the text (generation stopped at max_tokens
    inside it) gives its complete points, as Ai2's `extract_points` does: each x/y pair whose
    two values are closed, or each whole `id x y` triple of a cut `coords` value. Molmo 2 time-stamped points get the
    ordinal of their time among all distinct times in the text as `image_index`.
    """
    widths, heights = _sizes(width, "width"), _sizes(height, "height")
    if (widths is None) != (heights is None):
        raise ValueError("width and height must be given together")
    if not isinstance(text, str):
        return []

    points: list[Point] = []
    pos = 0
    while (tag := _TAG.search(text, pos)) is not None:
        pos = tag.end()
        name, body = tag.group(1), tag.group(2)
        inner = None
        if (
            not body.rstrip().endswith("/")
            and (close := _CLOSE.match(text, pos))
            and close.group(2) == name
        ):
            inner = _unescape(close.group(1)).strip() or None
            pos = close.end()
        attrs = _attributes(body)
        label = _unescape(attrs.get("alt", "")) or inner
        if "coords" in attrs:
            points += _coords_points(attrs["coords"], label, video=name == "tracks")
        else:
            points += _v1_points(attrs, label)
    points += _cut_off_tag(text, pos)

    times = sorted({p.time for p in points if p.time is not None})
    frame_of = {t: i for i, t in enumerate(times)}
    for p in points:
        if p.time is not None:
            p.image_index = frame_of[p.time]
        if widths is not None and heights is not None:
            w, h = _size_for(widths, p.image_index), _size_for(heights, p.image_index)
            if w is not None and h is not None:
                p.x, p.y = p.x_norm * w, p.y_norm * h
    return points


# ---------------------------------------------------------------- formatting


def _escape(s: str, quote: bool) -> str:
    # Escape only what would break the tag, so ordinary labels ("cats & dogs") stay as Molmo
    # writes them; `&` is escaped only where it would otherwise read back as an entity.
    s = _AMP_BEFORE_ENTITY.sub("&amp;", s).replace("<", "&lt;")
    return s.replace('"', "&quot;") if quote else s


def _cells(
    points: Sequence[Point] | Sequence[tuple[float, float]],
    width: float | None,
    height: float | None,
) -> list[tuple[str, str]]:
    """The (x, y) percentages Molmo writes for `points`, one decimal, in the order given."""
    if (width is None) != (height is None):
        raise ValueError("width and height must be given together")
    w, h = _sizes(width, "width"), _sizes(height, "height")
    if isinstance(w, list) or isinstance(h, list):
        raise ValueError("width and height must be single numbers (one image)")

    cells: list[tuple[str, str]] = []
    for i, p in enumerate(points):
        if isinstance(p, Point):
            xn, yn = p.x_norm, p.y_norm
        else:
            try:
                x, y = (float(v) for v in p)
            except (TypeError, ValueError):
                raise ValueError(
                    f"points[{i}] must be an (x, y) pair or a Point, got {p!r}"
                ) from None
            xn, yn = (x / w, y / h) if w and h else (x, y)
        if not (0.0 <= xn <= 1.0 and 0.0 <= yn <= 1.0):  # also rejects nan
            bounds = f"[0, {w:g}] x [0, {h:g}] pixels" if w and h else "[0, 1]"
            raise ValueError(f"points[{i}] = {p!r} is outside the image ({bounds})")
        cells.append((f"{xn * 100:.1f}", f"{yn * 100:.1f}"))
    return cells


def _reading_order(cells: list[tuple[str, str]]) -> list[int]:
    # Top-down, then left-right, on the numbers as written (a stable sort: ties keep their order).
    return sorted(range(len(cells)), key=lambda i: (float(cells[i][1]), float(cells[i][0])))


def reading_order(
    points: Sequence[Point] | Sequence[tuple[float, float]],
    width: float | None = None,
    height: float | None = None,
) -> list[int]:
    """The indices of `points` in the order `format_points` writes them (same arguments)."""
    return _reading_order(_cells(points, width, height))


def format_points(
    points: Sequence[Point] | Sequence[tuple[float, float]],
    label: str,
    alt: str | None = None,
    width: float | None = None,
    height: float | None = None,
    keep_order: bool = False,
) -> str:
    """Molmo v1 target text for the points of one image.

    `points` are (x, y) pairs in pixels when `width`/`height` are given, else normalized 0-1;
    `Point` objects contribute their normalized coordinates. They are written as percentages
    with one decimal, ordered top-down then left-right (`reading_order`):
    `<point x=".." y=".." alt="..">label</point>` for one, `<points x1=".." y1=".." x2=".." ...
    alt="..">label</points>` for several (`keep_order` numbers them in the order given instead,
    for answers that are not Molmo's order on purpose, such as training augmentations). `alt`
    defaults to `label`. With no points the answer is the plain text `NOT_PRESENT` ("There are
    none."), as Molmo answers when the object is absent.
    """
    if not isinstance(label, str):
        raise ValueError(f"label must be a string, got {type(label).__name__}")
    if alt is not None and not isinstance(alt, str):
        raise ValueError(f"alt must be a string or None, got {type(alt).__name__}")
    cells = _cells(points, width, height)
    if not cells:
        return NOT_PRESENT

    if not keep_order:
        cells = [cells[i] for i in _reading_order(cells)]
    alt_attr = _escape(label if alt is None else alt, quote=True)
    inner = _escape(label, quote=False)
    if len(cells) == 1:
        x, y = cells[0]
        return f'<point x="{x}" y="{y}" alt="{alt_attr}">{inner}</point>'
    coords = " ".join(f'x{k}="{x}" y{k}="{y}"' for k, (x, y) in enumerate(cells, start=1))
    return f'<points {coords} alt="{alt_attr}">{inner}</points>'


# ---------------------------------------------------------------- scoring
# The paper's pointing evaluation, shared by `molmo eval` (training/evaluate.py) and the load
# benchmark (molmo_bench), so that both report the same F1 and counting accuracy.

_COUNT_RE = re.compile(r"there (?:is|are) (\d+)", re.IGNORECASE)


def inside(point: Sequence[float], box: Sequence[float]) -> bool:
    """Whether (x, y) lies in the box (x0, y0, x1, y1), edges included: a hit for pointing."""
    x, y = point
    x0, y0, x1, y1 = box
    return x0 <= x <= x1 and y0 <= y <= y1


def match_points(
    points: Sequence[tuple[float, float]], boxes: Sequence[Sequence[float]]
) -> list[tuple[int, int]]:
    """One-to-one matching of points to boxes that maximises the hits (a point inside its
    box), ties broken by the distance to the box centre. Returns (point, box) index pairs."""
    if not points or not boxes:
        return []
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    p = np.asarray(points, dtype=np.float64)  # [P, 2]
    b = np.asarray(boxes, dtype=np.float64)  # [T, 4]
    centres = (b[:, :2] + b[:, 2:]) / 2.0  # [T, 2]
    dist = np.linalg.norm(p[:, None, :] - centres[None, :, :], axis=-1)  # [P, T]
    hit = (
        (p[:, None, 0] >= b[None, :, 0]) & (p[:, None, 0] <= b[None, :, 2])
        & (p[:, None, 1] >= b[None, :, 1]) & (p[:, None, 1] <= b[None, :, 3])
    )  # [P, T]  # fmt: skip
    # A hit always beats a miss: misses cost more than any distance term can add up to.
    scale = float(dist.max()) + 1.0
    cost = np.where(hit, 0.0, float(len(points) + len(boxes))) + dist / (scale * (len(points) + len(boxes)))
    rows, cols = linear_sum_assignment(cost)
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True)]


def point_scores(
    points: Sequence[tuple[float, float]], boxes: Sequence[Sequence[float]]
) -> dict[str, float]:
    """Precision, recall, F1 and hits of one answer's points against the true boxes."""
    hits = sum(inside(points[i], boxes[j]) for i, j in match_points(points, boxes)) if boxes else 0
    return scores_from_hits(hits, len(points), len(boxes))


def scores_from_hits(hits: int, n_points: int, n_true: int) -> dict[str, float]:
    """Precision, recall, F1 and hits of one answer, given its matched hits. With nothing to
    point at ("not present"), an answer is right exactly when it points at nothing."""
    if not n_true:
        ok = float(not n_points)
        return {"precision": ok, "recall": ok, "f1": ok, "hits": 0}
    precision = hits / n_points if n_points else 0.0
    recall = hits / n_true
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "hits": hits}


def parse_count(text: str) -> int:
    """The count an answer states: "there are N", else its number of points (0 for none)."""
    found = _COUNT_RE.findall(text)
    if found:
        return int(found[-1])
    return len(parse_points(text))
