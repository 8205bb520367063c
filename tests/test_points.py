"""Tests for molmo_model/points.py: reading v1 and Molmo 2 point tags, writing v1 targets.

Run: PYTHONPATH=. pytest tests/test_points.py
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from molmo_model.points import NOT_PRESENT, Point, format_points, parse_points, reading_order

# ---------------------------------------------------------------- v1


def test_single_point_in_percent_and_pixels():
    text = 'Here: <point x="61.5" y="40.2" alt="a dog">a dog</point>.'
    (p,) = parse_points(text)
    assert (p.x, p.y) == (None, None)
    assert p.x_norm == pytest.approx(0.615) and p.y_norm == pytest.approx(0.402)
    assert p.label == "a dog" and p.image_index == 0
    (q,) = parse_points(text, width=200, height=100)
    assert q.x == pytest.approx(123.0) and q.y == pytest.approx(40.2)


def test_numbered_points_keep_index_order_not_attribute_order():
    text = (
        '<points x2="20.0" y2="30.1" x10="5" y10="6" x1="10.0" y1="12.5" alt="dogs">dogs</points>'
    )
    pts = parse_points(text, 1000, 1000)
    assert [(p.x, p.y) for p in pts] == [
        pytest.approx((100.0, 125.0)),
        pytest.approx((200.0, 301.0)),
        pytest.approx((50.0, 60.0)),
    ]
    assert {p.label for p in pts} == {"dogs"}


@pytest.mark.parametrize(
    "text",
    [
        "<point x='61.5' y='40.2' alt='a dog'>a dog</point>",
        '<point   y = "40.2"   x = "61.5"  alt="a dog" >a dog</point >',
        '<point alt="a dog" x=61.5 y=40.2>a dog</point>',
        '<point x="61.5" y="40.2" alt="a dog"/>',
        '<point x=" 61.5 " y="40.2">a dog</point>',
        '<point x="61.5" y="40.2">  a dog  </point>',
    ],
)
def test_quoting_spacing_and_order_variations(text):
    (p,) = parse_points(text)
    assert (p.x_norm, p.y_norm) == pytest.approx((0.615, 0.402))
    assert p.label == "a dog"


def test_label_falls_back_to_inner_text_and_alt_wins():
    assert parse_points('<point x="1" y="2">cat</point>')[0].label == "cat"
    assert parse_points('<point x="1" y="2" alt="a cat">cat</point>')[0].label == "a cat"
    assert parse_points('<point x="1" y="2">  </point>')[0].label is None
    assert parse_points('<point x="1" y="2">')[0].label is None


def test_several_tags_in_one_text_in_written_order():
    text = (
        'A <point x="10" y="10" alt="cat">cat</point> and two '
        '<points x1="20" y1="20" x2="30" y2="30" alt="dogs">dogs</points>, '
        'not <point x="40" y="40">bird</point>'
    )
    pts = parse_points(text)
    assert [p.label for p in pts] == ["cat", "dogs", "dogs", "bird"]
    assert [p.x_norm for p in pts] == pytest.approx([0.1, 0.2, 0.3, 0.4])


@pytest.mark.parametrize(
    "value", ["100.1", "-5", "nan", "NaN", "inf", "1e3", "1e-3", "abc", "", "1" * 400, "5.5.5"]
)
def test_out_of_range_or_non_numeric_values_drop_the_point(value):
    text = f'<points x1="{value}" y1="50" x2="50" y2="{value}" x3="25" y3="75">x</points>'
    pts = parse_points(text)
    assert [(p.x_norm, p.y_norm) for p in pts] == [pytest.approx((0.25, 0.75))]


def test_bounds_are_inclusive():
    pts = parse_points('<points x1="0" y1="100" x2="100.0" y2="0.0">x</points>')
    assert [(p.x_norm, p.y_norm) for p in pts] == [(0.0, 1.0), (1.0, 0.0)]


def test_pairs_missing_a_coordinate_are_ignored():
    text = '<points x1="10" y1="10" x2="20" y3="30" x4="40" y4="40">x</points>'
    assert [p.x_norm for p in parse_points(text)] == pytest.approx([0.1, 0.4])
    assert parse_points('<point x="10">x</point>') == []


def test_text_without_points():
    assert parse_points("There are none.") == []
    assert parse_points("") == []
    assert parse_points("x=10 y=20 <pointer x='1' y='2'> <b>point</b>") == []


# ---------------------------------------------------------------- Molmo 2


def test_molmo2_points_one_image():
    text = '<points alt="dogs" coords="1 1 900 400 2 911 800">dogs</points>'
    pts = parse_points(text, 1000, 500)
    assert [(p.point_id, p.image_index, p.time) for p in pts] == [(1, 0, None), (2, 0, None)]
    assert [(p.x, p.y) for p in pts] == [pytest.approx((900, 200)), pytest.approx((911, 400))]
    assert [(p.x_norm, p.y_norm) for p in pts] == [(0.9, 0.4), pytest.approx((0.911, 0.8))]
    assert {p.label for p in pts} == {"dogs"}


def test_molmo2_several_images_with_sizes_per_image():
    # Groups are tab-separated: image 1 has points 1 and 2, image 3 has point 3.
    text = '<points coords="1 1 500 500 2 100 900\t3 3 250 750" alt="cups">cups</points>'
    pts = parse_points(text, width=[100, 200, 300], height=[10, 20, 30])
    assert [p.image_index for p in pts] == [0, 0, 2]
    assert [p.point_id for p in pts] == [1, 2, 3]
    assert [(p.x, p.y) for p in pts] == [
        pytest.approx((50, 5)),
        pytest.approx((10, 9)),
        pytest.approx((75, 22.5)),
    ]
    # An image beyond the given sizes keeps its normalized point but gets no pixels.
    (p,) = parse_points('<points coords="4 1 500 500"/>', width=[100], height=[100])
    assert p.image_index == 3 and p.x is None and p.x_norm == 0.5
    (p,) = parse_points('<points coords="4 1 500 500"/>', width=[100, 7], height=[100, 7])
    assert p.x is None


def test_molmo2_other_group_separators_and_bad_groups():
    text = '<points coords="1 1 100 200;2 2 300 400,0 9 500 500:x 7 1 1, 2 3 1001 5 4 600 700 5 6">'
    pts = parse_points(text)
    # "0" (images are 1-based) and "x" are not image indices; 1001 is out of range; "5 6" is
    # an incomplete triple.
    assert [(p.image_index, p.point_id, p.x_norm, p.y_norm) for p in pts] == [
        (0, 1, 0.1, 0.2),
        (1, 2, 0.3, 0.4),
        (1, 4, 0.6, 0.7),
    ]


def test_molmo2_tracks_use_time_ordinals_as_image_index():
    text = (
        '<tracks coords="0.5 1 500 400 2 300 200\t1.0 1 510 400" alt="cars">cars</tracks>'
        ' then <tracks coords="0.0 7 100 100\t1.0 7 110 100" alt="bike"/>'
    )
    pts = parse_points(text, 640, 480)
    assert [(p.time, p.point_id, p.label) for p in pts] == [
        (0.5, 1, "cars"),
        (0.5, 2, "cars"),
        (1.0, 1, "cars"),
        (0.0, 7, "bike"),
        (1.0, 7, "bike"),
    ]
    # Distinct times 0.0 < 0.5 < 1.0 are frames 0, 1, 2 across the whole text.
    assert [p.image_index for p in pts] == [1, 1, 2, 0, 2]
    assert pts[0].x == pytest.approx(320.0) and pts[0].y == pytest.approx(192.0)


def test_molmo2_points_with_decimal_head_are_video_times():
    (p,) = parse_points('<points coords="2.5 1 500 500">x</points>')
    assert p.time == 2.5 and p.image_index == 0


def test_v1_and_molmo2_mixed():
    text = '<point x="50" y="50">a</point><points coords="1 1 250 250">b</points>'
    assert [(p.label, p.x_norm) for p in parse_points(text)] == [("a", 0.5), ("b", 0.25)]


# ---------------------------------------------------------------- sizes and as_dict


def test_bad_sizes_raise_value_error_naming_the_field():
    with pytest.raises(ValueError, match="width"):
        parse_points("", width=0, height=10)
    with pytest.raises(ValueError, match="height"):
        parse_points("", width=10, height=float("nan"))
    with pytest.raises(ValueError, match="width"):
        parse_points("", width="wide", height=10)
    with pytest.raises(ValueError, match="together"):
        parse_points("", width=10)


def test_as_dict():
    (p,) = parse_points('<point x="50" y="25" alt="cat">cat</point>', 10, 20)
    assert p.as_dict() == {
        "x": 5.0,
        "y": 5.0,
        "x_norm": 0.5,
        "y_norm": 0.25,
        "label": "cat",
        "image_index": 0,
        "point_id": None,
        "time": None,
    }


# ---------------------------------------------------------------- format_points


def test_format_one_point_pixels():
    text = format_points([(123.0, 40.2)], "a dog", width=200, height=100)
    assert text == '<point x="61.5" y="40.2" alt="a dog">a dog</point>'


def test_format_orders_top_down_then_left_right_and_numbers():
    pts = [(0.5, 0.2), (0.1, 0.2), (0.3, 0.1)]
    text = format_points(pts, "dogs", alt="three dogs")
    assert text == (
        '<points x1="30.0" y1="10.0" x2="10.0" y2="20.0" x3="50.0" y3="20.0" '
        'alt="three dogs">dogs</points>'
    )


def test_reading_order_is_the_order_format_points_writes():
    # In pixels, y 20.04 and 20.01 both write as "20.0": the tie goes to x, as in the text.
    pts = [(150.0, 20.04), (50.0, 40.0), (20.0, 20.01), (90.0, 10.0)]
    order = reading_order(pts, width=200, height=100)
    assert order == [3, 2, 0, 1]
    text = format_points(pts, "dogs", width=200, height=100)
    written = [(p.x, p.y) for p in parse_points(text, 200, 100)]
    assert written == [(round(pts[i][0], 1), round(pts[i][1], 1)) for i in order]
    ordered = [pts[i] for i in order]
    assert format_points(ordered, "dogs", width=200, height=100, keep_order=True) == text


def test_format_accepts_points_and_none_present():
    assert format_points([], "dogs") == NOT_PRESENT == "There are none."
    assert parse_points(format_points([], "dogs")) == []
    pts = parse_points('<point x="12.3" y="45.6">cat</point>')
    assert format_points(pts, "cat") == '<point x="12.3" y="45.6" alt="cat">cat</point>'


def test_format_escapes_only_what_breaks_the_tag():
    text = format_points([(0.5, 0.5)], "cats & <dogs>", alt='the "big" one')
    assert text == '<point x="50.0" y="50.0" alt="the &quot;big&quot; one">cats & &lt;dogs></point>'
    assert parse_points(text)[0].label == 'the "big" one'
    text = format_points([(0.5, 0.5)], "cats & <dogs>", alt="")
    assert parse_points(text)[0].label == "cats & <dogs>"


@pytest.mark.parametrize(
    "points, kwargs, field",
    [
        ([(1.5, 0.5)], {}, "points\\[0\\]"),
        ([(0.5, 0.5), (float("nan"), 0.5)], {}, "points\\[1\\]"),
        ([(201, 5)], {"width": 200, "height": 100}, "points\\[0\\]"),
        ([(1, 2, 3)], {}, "points\\[0\\]"),
        ([(0.5, 0.5)], {"width": 200}, "together"),
        ([(0.5, 0.5)], {"width": -1, "height": 1}, "width"),
        ([(0.5, 0.5)], {"width": [1, 2], "height": [1, 2]}, "single"),
    ],
)
def test_format_rejects_bad_input(points, kwargs, field):
    with pytest.raises(ValueError, match=field):
        format_points(points, "x", **kwargs)


_unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
_label = st.text(min_size=1, max_size=30).filter(lambda s: s.strip() == s)


@given(
    pts=st.lists(st.tuples(_unit, _unit), max_size=12),
    label=st.text(min_size=1, max_size=30),
    size=st.none() | st.tuples(st.integers(1, 4000), st.integers(1, 4000)),
)
@settings(max_examples=200, deadline=None)
def test_round_trip(pts, label, size):
    w, h = size if size else (None, None)
    given_pts = [(x * w, y * h) for x, y in pts] if size else pts
    text = format_points(given_pts, label, width=w, height=h)
    back = parse_points(text, w, h)
    assert len(back) == len(pts)
    norms = [(x / w, y / h) for x, y in given_pts] if size else pts
    expected = sorted(norms, key=lambda p: (float(f"{p[1] * 100:.1f}"), float(f"{p[0] * 100:.1f}")))
    for p, (x, y) in zip(back, expected, strict=True):
        assert p.label == label
        assert abs(p.x_norm - x) <= 0.0005 + 1e-9 and abs(p.y_norm - y) <= 0.0005 + 1e-9
        if size:
            assert p.x == pytest.approx(p.x_norm * w) and p.y == pytest.approx(p.y_norm * h)
    ys = [(p.y_norm, p.x_norm) for p in back]
    assert ys == sorted(ys)


@given(pts=st.lists(st.tuples(_unit, _unit), min_size=1, max_size=5), label=_label)
@settings(max_examples=100, deadline=None)
def test_round_trip_through_inner_text(pts, label):
    text = format_points(pts, label, alt="")  # no alt: the label comes from the inner text
    assert {p.label for p in parse_points(text)} == {label}


# ---------------------------------------------------------------- never raises, stays linear


_tagish = st.sampled_from(
    ["<point", "<points", "<tracks", ">", "</point>", "</points>", "/>", '"', "'", "=", " ",
     "x", "y", "x1", "y12", "alt", "coords", "\t", ";", "1", "50.5", "999", "-3", "nan", "1e9"]
)  # fmt: skip


@given(text=st.text(max_size=300) | st.lists(_tagish, max_size=60).map("".join))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_never_raises_and_results_are_in_range(text):
    for p in parse_points(text, 640, 480):
        assert 0.0 <= p.x_norm <= 1.0 and 0.0 <= p.y_norm <= 1.0
        assert math.isfinite(p.x) and math.isfinite(p.y)
        assert p.image_index >= 0


@pytest.mark.parametrize(
    "text, n",
    [
        ('<point x="1e999" y="1">x</point>', 0),
        ('<point x="' + "9" * 5000 + '" y="1">x</point>', 0),
        ('<point x="50" y="50" <point x="10" y="10">a</point>', 1),  # nested: inner one wins
        ('<points x1="10" y1="10"><point x="20" y="20">b</point></points>', 2),
        ('<points x1="10" y1="10" x2="20', 1),  # cut off: its one complete pair
        ('<point x="10" y="10">never closed', 1),
        ('<points coords="1 1 500', 0),
        ('<points coords="1 1 ' + "9" * 5000 + ' 5">', 0),
        (None, 0),
        (b'<point x="1" y="1">', 0),
    ],
)
def test_adversarial_cases(text, n):
    assert len(parse_points(text)) == n  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text",
    [
        "<point " * 150_000,
        '<points x1="' * 90_000,
        "<point " + "a" * 1_000_000 + ">",
        "<point " + "a=" * 500_000 + ">",
        "<point a" + " " * 1_000_000 + ">",
        '<point "' + '"' * 1_000_000,
        "<" * 1_000_000,
        '<point x="1" y="2">' + "a" * 1_000_000,
        '<points coords="' + "1\t" * 300_000 + '">',
        '<points x1="1" y1="2" <point x="3" y="4">>' * 25_000,
    ],
    ids=["opens", "open-quotes", "long-name", "many-attrs", "spaces", "quotes", "lt", "inner",
         "coords-groups", "nested"],
)  # fmt: skip
def test_megabyte_inputs_parse(text):
    # Linear-time regexes: each finishes in well under a second here; a backtracking
    # regex would not finish at all.
    pts = parse_points(text)
    assert all(isinstance(p, Point) for p in pts)


def test_many_valid_tags():
    text = '<point x="1" y="2">a</point>' * 40_000
    pts = parse_points(text, 100, 100)
    assert len(pts) == 40_000 and pts[-1].x == pytest.approx(1.0)
