"""Points in a model answer, in pixels of the image each refers to.

`molmo_model.points.parse_points` reads the tags (Molmo v1 percentages, Molmo 2 0-1000
coords with an image index). Pixels are those of the image the client sent, after its EXIF
orientation (what `load_image` returns), so a point lands where the user sees it. An answer
that max_tokens cut off inside its `<points ...` tag keeps the complete pairs it wrote. A point
that names an image the request does not have keeps its normalized coordinates and gets
x = y = None.
"""

from __future__ import annotations

from molmo_model.points import parse_points
from server.protocol import PixelPoint, PointOut


def points_in_answer(text: str, sizes: list[tuple[int, int]]) -> list[PointOut]:
    """Every point in `text`; `sizes` are the request's images' (width, height) in order."""
    out: list[PointOut] = []
    for p in parse_points(text):
        size = sizes[p.image_index] if 0 <= p.image_index < len(sizes) else None
        out.append(
            PointOut(
                # Rounded past what Molmo writes (0.1% / 0.001 steps): no float noise in JSON.
                x=round(p.x_norm * size[0], 2) if size else None,
                y=round(p.y_norm * size[1], 2) if size else None,
                x_norm=round(p.x_norm, 6),
                y_norm=round(p.y_norm, 6),
                label=p.label,
                image_index=p.image_index,
            )
        )
    return out


def pixel_points(text: str, size: tuple[int, int]) -> list[PixelPoint]:
    """The points of a one-image pointing answer ("not present" answers give [])."""
    return [
        PixelPoint(x=p.x, y=p.y, x_norm=p.x_norm, y_norm=p.y_norm)
        for p in points_in_answer(text, [size])
        if p.image_index == 0 and p.x is not None and p.y is not None
    ]
