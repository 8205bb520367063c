"""Ask a running `molmo serve` to point at something, and draw the points on the image.

    python -m server --model DIR &                       # or: molmo serve --model DIR
    python clients/example.py --image photo.jpg --object "red circles" --out marked.png

Without --image a synthetic picture with three red circles is used. With the random-weight
default model the points are noise; with a trained model they land on the objects.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clients.molmo_client import MolmoAPIError, MolmoClient  # noqa: E402


def synthetic_image() -> Image.Image:
    img = Image.new("RGB", (640, 480), "white")
    draw = ImageDraw.Draw(img)
    for x, y in [(120, 100), (400, 160), (260, 360)]:
        draw.ellipse((x - 40, y - 40, x + 40, y + 40), fill="red")
    draw.rectangle((480, 320, 580, 420), fill="blue")
    return img


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key")
    p.add_argument("--image", help="image file (default: a synthetic one)")
    p.add_argument("--object", default="red circles")
    p.add_argument("--out", default="points.png", help="where to save the image with the points")
    p.add_argument("--max-tokens", type=int, default=128)
    args = p.parse_args()

    # The server's pixels are those of the image after its EXIF rotation: draw on the same.
    image = ImageOps.exif_transpose(Image.open(args.image)) if args.image else synthetic_image()
    with MolmoClient(args.url, api_key=args.api_key) as client:
        try:
            answer = client.point_full(args.image or image, args.object, max_tokens=args.max_tokens)
            reply = client.chat(f"How many {args.object} are there?", images=[image], max_tokens=32)
        except MolmoAPIError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    print(f"model said: {answer['text']!r}")
    print(f"{answer['count']} point(s):")
    draw = ImageDraw.Draw(image)
    for pt in answer["points"]:
        print(f"  x={pt.x:.1f} y={pt.y:.1f} (normalized {pt.x_norm:.3f}, {pt.y_norm:.3f})")
        draw.ellipse((pt.x - 6, pt.y - 6, pt.x + 6, pt.y + 6), outline="lime", width=3)
    print(f"chat answer: {reply.text!r} (points in it: {len(reply.points)})")
    image.save(args.out)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
