"""Dense captions of the shape scenes, and the paper's length-hinted caption prompt.

`describe_scene(scene)` writes a short caption: the background, how many shapes of each kind
and colour there are, and where each group sits (a ninth of the image, a half, or all over).
`caption_prompt(caption, rng)` gives the prompt it is trained behind: `long_caption 83:` with
a noisy length hint (`length_hint`, as in the paper) most of the time, else `long_caption:`.
"""

from __future__ import annotations

import random
from collections import Counter

from training.data.synthetic.scenes import PLURALS, Scene

_NUMBER_WORDS = (
    "no one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"
).split()


def _number_word(n: int) -> str:
    return _NUMBER_WORDS[n] if n < len(_NUMBER_WORDS) else str(n)


def _region(x: float, y: float, width: int, height: int) -> str:
    row = ("top", "middle", "bottom")[min(2, int(3 * y / height))]
    col = ("left", "centre", "right")[min(2, int(3 * x / width))]
    if row == "middle":
        return "in the centre" if col == "centre" else f"on the {col}"
    return f"at the {row}" if col == "centre" else f"in the {row} {col}"


def _whereabouts(centres: list[tuple[float, float]], width: int, height: int) -> str:
    """Where a group of shapes is: one ninth of the image, one half, or all over."""
    regions = {_region(x, y, width, height) for x, y in centres}
    if len(regions) == 1:
        return regions.pop()
    xs, ys = [x for x, _ in centres], [y for _, y in centres]
    for inside, phrase in (
        (max(ys) < height / 2, "in the upper half"),
        (min(ys) >= height / 2, "in the lower half"),
        (max(xs) < width / 2, "in the left half"),
        (min(xs) >= width / 2, "in the right half"),
    ):
        if inside:
            return phrase
    return "spread across the image"


def describe_scene(scene: Scene) -> str:
    """A short dense caption: the background, what shapes there are, and where."""
    n = len(scene.objects)
    size = f"A {scene.width} by {scene.height} picture"
    if n == 0:
        return f"{size} of {scene.background} with no shapes on it."
    groups = Counter((o.colour, o.kind) for o in scene.objects)
    order = sorted(groups, key=lambda g: (-groups[g], g))
    names = {g: f"{g[0]} {PLURALS[g[1]] if groups[g] > 1 else g[1]}" for g in order}
    listed = [f"{_number_word(groups[g])} {names[g]}" for g in order]
    shapes = "shape" if n == 1 else "shapes"
    sentences = [f"{size} of {_number_word(n)} flat {shapes} on {scene.background}."]
    sentences.append(f"There {'is' if n == 1 else 'are'} {_join(listed)}.")
    places = []
    for g in order:
        centres = [o.centre for o in scene.matching(g[1], g[0])]
        verb = "is" if len(centres) == 1 else "are"
        places.append(f"the {names[g]} {verb} {_whereabouts(centres, scene.width, scene.height)}")
    sentences.append(_join(places)[0].upper() + _join(places)[1:] + ".")
    return " ".join(sentences)


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def length_hint(text: str, rng: random.Random) -> int:
    """The paper's noisy length hint: (characters + N(0, 25)) // 15, at least 0."""
    return max(0, int((len(text) + rng.gauss(0.0, 25.0)) // 15))


def caption_prompt(
    caption: str, rng: random.Random, hint_prob: float = 0.9
) -> tuple[str, int | None]:
    """(`long_caption 83:`, 83) `hint_prob` of the time, else (`long_caption:`, None)."""
    if rng.random() < hint_prob:
        hint = length_hint(caption, rng)
        return f"long_caption {hint}:", hint
    return "long_caption:", None
