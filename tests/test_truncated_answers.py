"""Answers cut short keep what they already say; answers that did not finish are not "stop".

A generation that reaches max_tokens inside `<points ...` has written some complete x/y
pairs: `parse_points` (and so the server's `points`) returns exactly those, as Ai2's
`extract_points` does, and nothing from a value the cut may have shortened. vLLM's "abort"
and "error" finish reasons become errors (503 / 500), never finish_reason "stop".
The end-to-end case (the served demo model stopped by max_tokens inside its tag) is in
test_server_fidelity.py.

    pytest tests/test_truncated_answers.py -q     # < 1 s, no engine
"""

from __future__ import annotations

import pytest

from molmo_model.points import format_points, parse_points
from server.errors import APIError
from server.outputs import finish_reason
from server.points import points_in_answer

FULL = '<points x1="10.0" y1="12.5" x2="20.0" y2="30.1" x3="45.5" y3="60.0" alt="dogs">dogs</points>'


def norm(text: str) -> list[tuple[float, float]]:
    return [(round(p.x_norm, 6), round(p.y_norm, 6)) for p in parse_points(text)]


def test_every_prefix_of_a_tag_gives_the_pairs_it_completes():
    """Cut FULL after every character: the points are the pairs whose x and y values are both
    closed in the prefix, in order, and never a value the cut shortened."""
    pairs = [(0.1, 0.125), (0.2, 0.301), (0.455, 0.6)]
    ends = [FULL.index(s) + len(s) for s in ('y1="12.5"', 'y2="30.1"', 'y3="60.0"')]
    for n in range(len(FULL) + 1):
        done = sum(n >= e for e in ends)
        assert norm(FULL[:n]) == pairs[:done], FULL[:n]


@pytest.mark.parametrize(
    "text, expected",
    [
        ('Sure. <points x1="10.0" y1="20.0" x2="30.0" y2="4', [(0.1, 0.2)]),
        ('<points x1="10.0" y1="20.0" x2=30.0 y2=4', [(0.1, 0.2)]),  # unquoted: may be cut
        ('<points x1="10.0" y1="20.0" x2=30.0 y2=40.0 ', [(0.1, 0.2), (0.3, 0.4)]),
        ('<point x="61.5" y="40', []),
        ('<point x="61.5" y="40.2" al', [(0.615, 0.402)]),
        ('<points x1="1.0" y1="2.0" alt="a">a</points> and <points x1="5.0" y1="6.0" x2="7', [(0.01, 0.02), (0.05, 0.06)]),
        # Molmo 2: whole `id x y` triples of the cut coords value; the last number may be cut.
        ('<points alt="d" coords="1 1 900 400 2 911 80', [(0.9, 0.4)]),
        ('<points alt="d" coords="1 1 900 400 2 911 800\t', [(0.9, 0.4), (0.911, 0.8)]),
        ("<poi", []),
        ("<points", []),
        ('<points x1="10.0" y1="20.0">', [(0.1, 0.2)]),  # complete tag, no closing tag
    ],
)
def test_cut_tags(text, expected):
    assert norm(text) == expected


def test_cut_tag_keeps_alt_and_pixels():
    text = '<points alt="red circles" x1="50.0" y1="25.0" x2="10.0" y'
    (p,) = parse_points(text, 640, 480)
    assert (p.x, p.y, p.label) == (320.0, 120.0, "red circles")
    (out,) = points_in_answer(text, [(640, 480)])
    assert (out.x, out.y, out.x_norm, out.y_norm) == (320.0, 120.0, 0.5, 0.25)


def test_cut_off_answers_of_format_points_read_back():
    """Molmo's own format, cut at every character: each prefix reads back a prefix of the
    points (a point never changes or appears out of order)."""
    pts = [(0.1 * i, 0.05 * i + 0.01) for i in range(1, 9)]
    text = format_points(pts, "dots")
    whole = norm(text)
    for n in range(len(text) + 1):
        got = norm(text[:n])
        assert got == whole[: len(got)], text[:n]


def test_finish_reasons():
    assert finish_reason("stop") == "stop"
    assert finish_reason("length") == "length"
    assert finish_reason(None) is None
    with pytest.raises(APIError) as aborted:
        finish_reason("abort")
    assert aborted.value.status == 503 and aborted.value.code == "generation_aborted"
    with pytest.raises(APIError) as failed:
        finish_reason("error")
    assert failed.value.status == 500 and failed.value.code == "engine_error"
