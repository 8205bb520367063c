"""Pieces shared by the synthetic generators (`scenes.py`, `clocks.py`).

Seeded random streams, config range checks, backgrounds (solid, gradient, noise, and the
opt-in texture and clutter) and chat turns.
"""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

BACKGROUNDS = ("solid", "gradient", "noise")  # the default styles
# Opt-in styles besides: low-contrast stripes or checks, and faint blobs and strokes in
# background tones (photo-like clutter that is never an object).
BACKGROUND_STYLES = (*BACKGROUNDS, "texture", "clutter")
# Muted backgrounds, far from every object colour in scenes.COLOURS.
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (246, 246, 242),
    "light grey": (205, 205, 205),
    "cream": (240, 231, 204),
    "pale blue": (206, 222, 240),
    "pale green": (213, 234, 213),
    "beige": (222, 208, 180),
    "dark grey": (68, 68, 72),
    "navy": (26, 32, 64),
}


def rng_for(seed: int, stream: str) -> random.Random:
    """An independent random stream per (seed, purpose).

    Separate streams keep, e.g., the questions from shifting the drawing. String seeds go
    through SHA-512, so they do not depend on PYTHONHASHSEED.
    """
    return random.Random(f"{stream}:{seed}")


def check_range(name: str, value: tuple[float, float], low: float = 0.0) -> None:
    """Raise ValueError naming `name` unless value is (min, max) with low <= min <= max."""
    if len(value) != 2 or not low <= value[0] <= value[1]:
        raise ValueError(f"{name} must be (min, max) with {low} <= min <= max, got {value}")


def check_subset(name: str, values: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    bad = [v for v in values if v not in allowed]
    if not values or bad:
        raise ValueError(f"{name} must be a non-empty subset of {allowed}, got {values}")


def render_background(
    width: int, height: int, style: str, rng: random.Random, tint: float = 0.0
) -> tuple[Image.Image, str]:
    """A background of `style` (BACKGROUND_STYLES) and a phrase describing it. `tint` > 0 moves
    the named colour by up to that many levels a channel (0 keeps the exact colours, and the
    random stream, of the default styles)."""
    name = rng.choice(sorted(BACKGROUND_COLOURS))
    base = np.array(BACKGROUND_COLOURS[name], dtype=np.float32)
    if tint > 0:
        base = np.clip(base + np.array([rng.uniform(-tint, tint) for _ in range(3)]), 0, 255)
    if style == "solid":
        array = np.broadcast_to(np.rint(base).astype(np.uint8), (height, width, 3))
        return Image.fromarray(np.ascontiguousarray(array), "RGB"), f"a plain {name} background"
    if style == "gradient":
        other = rng.choice(sorted(set(BACKGROUND_COLOURS) - {name}))
        angle = rng.uniform(0.0, 2.0 * math.pi)
        xs = np.arange(width, dtype=np.float32)[None, :] * math.cos(angle)  # [1, W]
        ys = np.arange(height, dtype=np.float32)[:, None] * math.sin(angle)  # [H, 1]
        t = xs + ys  # [H, W]
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)  # [H, W] in [0, 1]
        end = np.array(BACKGROUND_COLOURS[other], dtype=np.float32)
        pixels = base + (end - base) * t[..., None]  # [H, W, 3]
        phrase = f"a background fading from {name} to {other}"
    elif style == "noise":
        noise = np.random.default_rng(rng.getrandbits(64))
        sd = rng.uniform(6.0, 18.0)
        pixels = base + sd * noise.standard_normal((height, width, 3), dtype=np.float32)
        phrase = f"a grainy {name} background"
    elif style == "texture":
        period = rng.uniform(6.0, 40.0)  # pixels per stripe or check
        angle = rng.uniform(0.0, math.pi)
        xs = np.arange(width, dtype=np.float32)[None, :]  # [1, W]
        ys = np.arange(height, dtype=np.float32)[:, None]  # [H, 1]
        u = (xs * math.cos(angle) + ys * math.sin(angle)) / period  # [H, W]
        if rng.random() < 0.5:
            wave = np.floor(u) % 2  # stripes
        else:
            v = (ys * math.cos(angle) - xs * math.sin(angle)) / period
            wave = (np.floor(u) + np.floor(v)) % 2  # checks
        pixels = base + rng.choice((-1.0, 1.0)) * rng.uniform(8.0, 24.0) * wave[..., None]
        phrase = f"a patterned {name} background"
    elif style == "clutter":
        image = Image.new("RGB", (width, height), tuple(int(v) for v in np.rint(base)))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(4, 14)):  # faint blobs and strokes, near the base tone
            shift = rng.uniform(-30.0, 30.0)  # mostly lighter or darker, barely tinted
            tone = tuple(int(np.clip(v + shift + rng.uniform(-6, 6), 0, 255)) for v in base)
            x, y = rng.uniform(0, width), rng.uniform(0, height)
            r = rng.uniform(0.05, 0.3) * min(width, height)
            if rng.random() < 0.5:
                draw.ellipse([x - r, y - 0.6 * r, x + r, y + 0.6 * r], fill=tone)
            else:
                draw.line([x, y, x + rng.uniform(-2, 2) * r, y + rng.uniform(-2, 2) * r],
                          fill=tone, width=rng.randint(1, 6))  # fmt: skip
        blurred = image.filter(ImageFilter.GaussianBlur(rng.uniform(1.0, 4.0)))
        return blurred, f"a cluttered {name} background"
    else:
        raise ValueError(f"background style must be one of {BACKGROUND_STYLES}, got {style!r}")
    array = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)  # [H, W, 3]
    return Image.fromarray(array, "RGB"), phrase


def chat(question: str, answer: str) -> list[dict[str, str]]:
    """One user turn and one assistant turn."""
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
