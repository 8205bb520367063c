"""PixMo-Clocks style analog clocks: a watch face set to a random time, and its reading.

`render_clock(seed)` draws a round face in a round or square case (sometimes on a strap)
over a solid, gradient or noisy background, with hour ticks (or minute ticks, or dots),
numerals (none, Arabic, Roman, or only 12/3/6/9), hour and minute hands (lines or tapered)
and sometimes a second hand. Angles are measured clockwise from 12 o'clock: the minute hand
sits at 6 * (minute + second / 60) degrees, the hour hand at 30 * (hour % 12 + minute / 60
+ second / 3600). The returned `Clock` keeps this geometry (centre, radius, hand tips) so
tests and evaluation can check the picture against the stated time.

`clock_annotations(clock)` asks "What time is it?" (and variants) -> "The time is 10:35.",
or the clock-reading benchmark's HH:MM question -> "10:35".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from training.data.records import Annotation
from training.data.synthetic.render import (
    BACKGROUNDS,
    chat,
    check_range,
    check_subset,
    render_background,
    rng_for,
)

CLOCK_TEMPLATES = (
    "What time is it?",
    "What time does the clock show?",
    "What time is shown on this watch?",
    "Can you tell me the time?",
    "What does the clock read?",
    "Read the time on this clock.",
)
# The clock-reading benchmark's query (paper, appendix); answered with a bare HH:MM.
HHMM_QUESTION = (
    "What time is being shown? Please respond only with the time as hours and minutes in "
    "HH:MM format."
)

# (face, ink): ink draws ticks, numerals and the hour and minute hands.
FACES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "white": ((250, 250, 248), (20, 20, 20)),
    "cream": ((242, 232, 205), (45, 30, 20)),
    "silver": ((200, 202, 208), (15, 15, 45)),
    "light blue": ((190, 215, 240), (10, 25, 70)),
    "black": ((22, 22, 24), (235, 235, 235)),
    "navy": ((22, 36, 82), (240, 240, 240)),
    "green": ((25, 72, 48), (242, 228, 172)),
}
RIMS: dict[str, tuple[int, int, int]] = {
    "silver": (168, 170, 178),
    "gold": (200, 160, 60),
    "black": (32, 32, 32),
    "brown": (110, 70, 40),
    "rose gold": (200, 140, 120),
    "white": (236, 236, 236),
}
SECOND_HAND_COLOURS = ((210, 30, 30), (240, 140, 0))
SECOND_HAND_LENGTH = 0.86  # of the face radius
TICKS = ("hours", "minutes", "dots")
NUMERALS = ("none", "arabic", "roman", "quarters")
HANDS = ("line", "tapered")
CASES = ("round", "square")
_ROMAN = "XII I II III IV V VI VII VIII IX X XI".split()


@dataclass
class ClockConfig:
    """How clocks are drawn and asked about."""

    width_range: tuple[int, int] = (288, 384)  # image width drawn uniformly from this (pixels)
    height_range: tuple[int, int] = (288, 384)
    radius_range: tuple[float, float] = (0.28, 0.42)  # face radius / shorter image side
    backgrounds: tuple[str, ...] = BACKGROUNDS
    second_hand_prob: float = 0.4
    strap_prob: float = 0.4
    hhmm_prob: float = 0.2  # share of questions asking for a bare HH:MM answer

    def __post_init__(self) -> None:
        self.width_range = tuple(int(v) for v in self.width_range)  # type: ignore[assignment]
        self.height_range = tuple(int(v) for v in self.height_range)  # type: ignore[assignment]
        self.backgrounds = tuple(self.backgrounds)
        check_range("width_range", self.width_range, 96)
        check_range("height_range", self.height_range, 96)
        check_range("radius_range", self.radius_range, 0.1)
        if self.radius_range[1] > 0.42:  # the face, its rim (up to 14%) and a margin must fit
            raise ValueError(f"radius_range max must be <= 0.42, got {self.radius_range}")
        check_subset("backgrounds", self.backgrounds, BACKGROUNDS)
        for name in ("second_hand_prob", "strap_prob", "hhmm_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


@dataclass
class Clock:
    """A rendered clock and its geometry. Angles in degrees clockwise from 12 o'clock."""

    image: Image.Image
    seed: int
    hour: int  # 1..12
    minute: int  # 0..59
    second: int | None  # 0..59 when a second hand is drawn, else None (hands at :00 seconds)
    centre: tuple[float, float]  # pixels
    radius: float  # face radius, pixels
    hour_length: float
    minute_length: float
    hand_colour: tuple[int, int, int]
    style: dict[str, str] = field(default_factory=dict)

    @property
    def hour_angle(self) -> float:
        return 30.0 * (self.hour % 12) + 0.5 * self.minute + (self.second or 0) / 120.0

    @property
    def minute_angle(self) -> float:
        return 6.0 * self.minute + 0.1 * (self.second or 0)

    @property
    def second_angle(self) -> float | None:
        return None if self.second is None else 6.0 * self.second

    def at(self, angle: float, distance: float) -> tuple[float, float]:
        """The pixel `distance` from the centre in direction `angle`."""
        a = math.radians(angle)
        return (self.centre[0] + distance * math.sin(a), self.centre[1] - distance * math.cos(a))

    @property
    def time_text(self) -> str:
        return f"{self.hour}:{self.minute:02d}"

    def geometry(self) -> dict[str, Any]:
        """JSON-safe facts for evaluation and tests: time, centre, radius, hand tips."""
        second_tip = None
        if self.second_angle is not None:
            second_tip = list(self.at(self.second_angle, SECOND_HAND_LENGTH * self.radius))
        return {
            "hour": self.hour,
            "minute": self.minute,
            "second": self.second,
            "centre": list(self.centre),
            "radius": self.radius,
            "hour_tip": list(self.at(self.hour_angle, self.hour_length)),
            "minute_tip": list(self.at(self.minute_angle, self.minute_length)),
            "second_tip": second_tip,
            "hand_colour": list(self.hand_colour),
            "style": dict(self.style),
        }


def _hand(
    draw: ImageDraw.ImageDraw,
    clock: Clock,
    angle: float,
    length: float,
    width: float,
    shape: str,
    colour: tuple[int, int, int],
) -> None:
    tip = clock.at(angle, length)
    if shape == "line":
        draw.line([clock.centre, tip], fill=colour, width=max(1, round(width)))
        return
    # Tapered: wide at the centre, a third as wide at the tip, with a short tail behind.
    side = clock.at(angle + 90.0, width / 2.0)
    dx, dy = side[0] - clock.centre[0], side[1] - clock.centre[1]  # half-width vector
    tail = clock.at(angle + 180.0, length * 0.15)
    draw.polygon(
        [
            (clock.centre[0] + dx, clock.centre[1] + dy),
            (tip[0] + dx / 3, tip[1] + dy / 3),
            (tip[0] - dx / 3, tip[1] - dy / 3),
            (clock.centre[0] - dx, clock.centre[1] - dy),
            tail,
        ],
        fill=colour,
    )


def render_clock(seed: int, config: ClockConfig | None = None) -> Clock:
    """Draw the clock of `seed` (see the module docstring)."""
    cfg = config or ClockConfig()
    rng = rng_for(seed, "clock")
    width, height = rng.randint(*cfg.width_range), rng.randint(*cfg.height_range)
    radius = rng.uniform(*cfg.radius_range) * min(width, height)
    rim = radius * rng.uniform(0.06, 0.14)
    outer = radius + rim
    centre = (  # the case (radius `outer`) stays inside the image
        outer + rng.uniform(0.0, max(0.0, width - 2.0 * outer)),
        outer + rng.uniform(0.0, max(0.0, height - 2.0 * outer)),
    )
    hour, minute = rng.randint(1, 12), rng.randint(0, 59)
    second = rng.randint(0, 59) if rng.random() < cfg.second_hand_prob else None
    style = {
        "face": rng.choice(sorted(FACES)),
        "rim": rng.choice(sorted(RIMS)),
        "case": rng.choice(CASES),
        "ticks": rng.choice(TICKS),
        "numerals": rng.choice(NUMERALS),
        "hands": rng.choice(HANDS),
        "strap": "yes" if rng.random() < cfg.strap_prob else "no",
    }
    face, ink = FACES[style["face"]]
    clock = Clock(
        image=render_background(width, height, rng.choice(cfg.backgrounds), rng)[0],
        seed=seed,
        hour=hour,
        minute=minute,
        second=second,
        centre=centre,
        radius=radius,
        hour_length=radius * rng.uniform(0.45, 0.55),
        minute_length=radius * rng.uniform(0.72, 0.82),
        hand_colour=ink,
        style=style,
    )
    draw = ImageDraw.Draw(clock.image)
    cx, cy = centre
    if style["strap"] == "yes":
        strap = tuple(max(0, v - 40) for v in RIMS[style["rim"]])
        draw.rectangle([cx - radius * 0.6, 0, cx + radius * 0.6, height], fill=strap)
    if style["case"] == "round":
        draw.ellipse([cx - outer, cy - outer, cx + outer, cy + outer], fill=RIMS[style["rim"]])
    else:
        draw.rounded_rectangle(
            [cx - outer, cy - outer, cx + outer, cy + outer],
            radius=outer * 0.3,
            fill=RIMS[style["rim"]],
        )
    draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=face)

    ticks = 60 if style["ticks"] == "minutes" else 12
    for i in range(ticks):
        angle = i * 360.0 / ticks
        major = ticks == 12 or i % 5 == 0
        if style["ticks"] == "dots":
            r = radius * (0.045 if i % 3 == 0 else 0.028)
            x, y = clock.at(angle, radius * 0.9)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=ink)
        else:
            inner = radius * (0.82 if major else 0.89)
            line_width = max(2, round(radius * 0.03)) if major else 1
            draw.line(
                [clock.at(angle, inner), clock.at(angle, radius * 0.95)], fill=ink, width=line_width
            )

    if style["numerals"] != "none":
        font = ImageFont.load_default(size=max(8, round(radius * 0.16)))
        for h in range(1, 13):
            if style["numerals"] == "quarters" and h % 3:
                continue
            text = _ROMAN[h % 12] if style["numerals"] == "roman" else str(h)
            draw.text(clock.at(h * 30.0, radius * 0.66), text, fill=ink, font=font, anchor="mm")

    # The second hand goes under the others, so it never hides the hands that tell the time.
    if clock.second_angle is not None:
        back = clock.at(clock.second_angle + 180.0, radius * 0.15)
        tip = clock.at(clock.second_angle, SECOND_HAND_LENGTH * radius)
        width = max(1, round(radius * 0.012))
        draw.line([back, tip], fill=rng.choice(SECOND_HAND_COLOURS), width=width)
    for angle, length, width in (
        (clock.hour_angle, clock.hour_length, max(6.0, radius * 0.075)),
        (clock.minute_angle, clock.minute_length, max(5.0, radius * 0.05)),
    ):
        _hand(draw, clock, angle, length, width, style["hands"], ink)
    cap = max(3.0, radius * 0.045)
    draw.ellipse([cx - cap, cy - cap, cx + cap, cy + cap], fill=ink)
    return clock


def clock_annotations(clock: Clock, config: ClockConfig | None = None) -> list[Annotation]:
    """One time-telling question about the clock."""
    cfg = config or ClockConfig()
    rng = rng_for(clock.seed, "clock-qa")
    info = {"hour": clock.hour, "minute": clock.minute}
    if rng.random() < cfg.hhmm_prob:
        return [
            Annotation(
                chat(HHMM_QUESTION, f"{clock.hour:02d}:{clock.minute:02d}"), task="clock", info=info
            )
        ]
    question = rng.choice(CLOCK_TEMPLATES)
    return [Annotation(chat(question, f"The time is {clock.time_text}."), task="clock", info=info)]
