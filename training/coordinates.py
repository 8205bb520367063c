"""Where an answer's point coordinates sit among its tokens.

Molmo writes a coordinate as digits and a dot right after `="` (`x2="45.3"`). The training
losses that treat coordinates specially (attention grounding in `training/extras/grounding.py`, the
loss mask of `Annotation.masked_points` in `training/packing.py`) find them the same way:
number the coordinates in writing order, x of the first point being 0, its y 1, x of the
second point 2, and so on.
"""

from __future__ import annotations

from collections.abc import Sequence


def single_token(tokenizer, text: str) -> int:
    """The id of `text`, which the tokenizer must encode as exactly one token."""
    ids = tokenizer.encode(text)
    if len(ids) != 1:
        raise ValueError(f"coordinates need {text!r} to be one token, the tokenizer gives {ids}")
    return ids[0]


def coordinate_numbers(ids: Sequence[int], tokenizer) -> list[int]:
    """For each token of `ids`, the number of the coordinate it spells, or -1 (any other token).

    Point k's x is coordinate 2k and its y 2k + 1, so `number // 2` is the point and
    `number % 2` the axis. Ids that are not tokens (-100, an ignored label) are just "other".
    """
    eq, dot = single_token(tokenizer, '="'), single_token(tokenizer, ".")
    digits = {single_token(tokenizer, str(i)) for i in range(10)}
    numbers, number, inside, previous = [], -1, False, None
    for t in ids:
        if t in digits and previous == eq:
            number, inside = number + 1, True
        elif t not in digits and t != dot:
            inside = False
        numbers.append(number if inside else -1)
        previous = t
    return numbers
