"""Loading user images safely: bytes, paths or PIL images in, an RGB `PIL.Image` out.

`load_image` is the one entry point. It

* refuses decompression bombs before any pixel is decoded: the header's width x height is
  checked against `max_pixels` (PIL's own `DecompressionBombError` is converted too);
* decodes eagerly, so truncated or corrupt files fail here and not later in the pipeline;
* applies the EXIF orientation (phone photos are stored sideways with a rotate tag);
* converts every mode to 8-bit RGB. Transparent images (RGBA, LA, PA, P with a transparent
  colour, premultiplied RGBa/La) are composited on WHITE, the way a viewer shows them on a
  page: dropping alpha instead exposes whatever colour the encoder left in invisible pixels
  (often black), which is not what the user saw (Ai2's Molmo model card also advises
  putting transparent images on a background first). 16-bit and 32-bit images (I;16*, I, F) are
  scaled to 8 bits instead of being clipped at 255 (PIL's own conversion clips);
* raises `ImageError` (a `ValueError`) with a message meant for the user for anything it
  cannot turn into a picture; no PIL exception escapes.

ICC colour profiles are ignored (pixels are taken as sRGB), as Ai2's preprocessing does.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 64_000_000  # 64 megapixels: above any camera a user is likely to send

_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_STRIPE_PIXELS = 1 << 20  # pixels converted at once by to_rgb (a few MB of temporaries)


class ImageError(ValueError):
    """The input is not an image we can use; the message names the problem."""


def load_image(
    data: bytes | bytearray | memoryview | str | os.PathLike | Image.Image,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode `data` into an RGB image with its EXIF orientation applied.

    `data` is encoded image bytes, a file path, or an already opened PIL image.
    Raises `ImageError` for empty, corrupt, truncated, non-image or too large inputs.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    if isinstance(data, Image.Image):
        image = data
        check_size(image.size, max_pixels)
        _decode(image)
    else:
        image = _open(data, max_pixels)
    image = _apply_exif_orientation(image)
    return to_rgb(image)


def to_rgb(image: Image.Image, reduce: int = 1) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (alpha composited on white, high bit depths scaled);
    `reduce` > 1 also shrinks the image by that factor (box filter) in the same pass.

    Large images are converted in horizontal stripes of about `_STRIPE_PIXELS` pixels, so the
    extra memory is a few MB whatever the image's size (a whole-image RGBA composite of a
    64-megapixel image would hold three full-size copies at once).
    """
    if reduce < 1:
        raise ValueError(f"reduce must be >= 1, got {reduce}")
    mode = image.mode
    if mode == "RGB":
        return image if reduce == 1 else image.reduce(reduce)
    try:
        value_range = _value_range(image) if mode in _HIGH_BIT_MODES else None
        width, height = image.size
        if width * height <= _STRIPE_PIXELS:
            rgb = _stripe_to_rgb(image, value_range)
            return rgb if reduce == 1 else rgb.reduce(reduce)
        rows = max(reduce, _STRIPE_PIXELS // width // reduce * reduce)  # a multiple of reduce
        out = Image.new("RGB", (-(-width // reduce), -(-height // reduce)))
        for top in range(0, height, rows):
            stripe = _stripe_to_rgb(
                image.crop((0, top, width, min(top + rows, height))), value_range
            )
            out.paste(stripe if reduce == 1 else stripe.reduce(reduce), (0, top // reduce))
        return out
    except (OSError, ValueError) as e:
        raise ImageError(f"cannot convert image mode {mode!r} to RGB: {e}") from e


def _stripe_to_rgb(image: Image.Image, value_range: tuple[float, float] | None) -> Image.Image:
    mode = image.mode
    if mode in _HIGH_BIT_MODES:
        return Image.fromarray(_to_uint8(np.asarray(image), value_range), mode="L").convert("RGB")
    if _has_alpha(image):
        if mode == "La":  # premultiplied L + alpha: PIL only converts it through LA
            image = image.convert("LA")
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _value_range(image: Image.Image) -> tuple[float, float]:
    """(min, max) of a one-band image's finite values (non-finite ones count as 0), read in
    stripes so no full-size float copy is made."""
    width, height = image.size
    rows = max(1, _STRIPE_PIXELS // max(width, 1))
    lo, hi = np.inf, -np.inf
    for top in range(0, height, rows):
        x = np.asarray(image.crop((0, top, width, min(top + rows, height))))
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        if x.size:
            lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
    return (lo, hi) if lo <= hi else (0.0, 0.0)


def _open(data: bytes | bytearray | memoryview | str | os.PathLike, max_pixels: int) -> Image.Image:
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            raise ImageError("image data is empty (0 bytes)")
        source: io.BytesIO | Path = io.BytesIO(bytes(data))
        where = "image data"
    elif isinstance(data, (str, os.PathLike)):
        source = Path(data)
        where = f"image file {str(source)!r}"
        if not source.is_file():
            raise ImageError(f"{where} does not exist or is not a file")
    else:
        raise ImageError(f"expected image bytes, a path or a PIL image, got {type(data).__name__}")
    try:
        # Image.open reads only the header; the size check below happens before decoding.
        with Image.open(source) as image:
            check_size(image.size, max_pixels)
            _decode(image)
            return image
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{where} is too large to decode safely: {e}") from e
    except Image.UnidentifiedImageError as e:
        raise ImageError(f"{where} is not in a recognised image format") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        raise ImageError(f"{where} is corrupt or unreadable: {e}") from e


def check_size(size: tuple[int, int], max_pixels: int) -> None:
    """Raise ImageError for a (width, height) with no pixels or more than `max_pixels`."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_pixels} pixels"
        )


def _decode(image: Image.Image) -> None:
    """Force PIL's lazy decoder to run now, so corrupt or truncated data fails here."""
    try:
        image.load()
    except Image.DecompressionBombError as e:
        raise ImageError(f"image is too large to decode safely: {e}") from e
    except Exception as e:
        raise ImageError(f"image data is corrupt or truncated: {e}") from e


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    try:
        # exif_transpose copies the image even when there is nothing to do: look first.
        if image.getexif().get(0x0112, 1) in (1, None):  # 0x0112: Orientation
            return image
        rotated = ImageOps.exif_transpose(image)
    except Exception:
        # A malformed EXIF block should not cost the user their image: keep it as stored.
        return image
    return image if rotated is None else rotated


def _has_alpha(image: Image.Image) -> bool:
    bands = image.getbands()
    return "A" in bands or "a" in bands or "transparency" in image.info


def _to_uint8(pixels: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Scale a single-channel integer or float array to uint8, in float32 (a float64 copy of
    a 64-megapixel image is 512 MB).

    16-bit data (I;16*, or mode I with values in 0..65535 above 255) maps 65535 -> 255;
    mode I already in 0..255 is kept; floats in [0, 1] map 1.0 -> 255; floats in 0..255 are
    kept; anything else is stretched from its minimum to its maximum. `value_range` is the
    (min, max) of the whole image when `pixels` is one stripe of it (default: of `pixels`).
    """
    x = pixels.astype(np.float32)
    if x.dtype.kind == "f" and pixels.dtype.kind == "f" and not np.isfinite(x).all():
        x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    if value_range is None:
        value_range = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    lo, hi = value_range
    if pixels.dtype.kind == "u" and pixels.dtype.itemsize == 2:
        x /= 257.0
    elif pixels.dtype.kind == "f":
        if lo >= 0.0 and hi <= 1.0:
            x *= 255.0
        elif not (lo >= 0.0 and hi <= 255.0):
            x = (x - np.float32(lo)) * np.float32(255.0 / max(hi - lo, 1e-12))
    elif lo >= 0 and hi <= 255:
        pass
    elif lo >= 0 and hi <= 65535:
        x /= 257.0
    else:
        x = (x - np.float32(lo)) * np.float32(255.0 / max(hi - lo, 1.0))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)
