"""`molmo point` and `molmo chat`: one request to a running server, for checks by hand.

    molmo point photo.jpg "red circles" --draw marked.png     # pixel points, drawn on a copy
    molmo chat photo.jpg "What is in the image?"               # the answer, streamed

Both talk to `--base-url` (default http://127.0.0.1:8000) through clients/molmo_client.py,
with `--api-key` or MOLMO_API_KEY. Exit codes: 0 answered, 1 server or network error,
2 bad usage (a missing image, a bad flag).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _parser(prog: str, what: str, text_arg: str, help_text: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=what)
    p.add_argument("image", help="an image file")
    p.add_argument(text_arg, help=help_text)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=os.environ.get("MOLMO_API_KEY"), help="or MOLMO_API_KEY")
    p.add_argument("--model", help="model name (default: the server's)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--timeout", type=float, default=300.0)
    return p


def _check_image(p: argparse.ArgumentParser, path: str) -> None:
    if not Path(path).is_file():
        p.error(f"image not found: {path}")


def _call(prog: str, fn) -> int:  # noqa: ANN001
    """Runs `fn()`, turning server and network errors into one line and exit code 1."""
    import httpx

    from clients.molmo_client import MolmoAPIError

    try:
        fn()
    except MolmoAPIError as e:
        print(f"{prog}: the server answered {e}", file=sys.stderr)
        return 1
    except httpx.HTTPError as e:
        print(f"{prog}: cannot reach the server: {e or type(e).__name__}", file=sys.stderr)
        return 1
    return 0


def draw_points(image_path: str, points: list, out: str) -> None:
    """A copy of the image (as the user sees it: EXIF orientation applied) with a ring
    around every point."""
    from PIL import Image, ImageDraw, ImageOps

    with Image.open(image_path) as im:
        img = ImageOps.exif_transpose(im).convert("RGB")
    draw = ImageDraw.Draw(img)
    r = max(4, min(img.size) // 60)
    for pt in points:
        if pt.x is not None:
            draw.ellipse((pt.x - r, pt.y - r, pt.x + r, pt.y + r), outline=(255, 0, 255), width=max(2, r // 2))
    img.save(out)


def point(argv: list[str]) -> int:
    p = _parser("molmo point", "Where is OBJECT in IMAGE? Pixel points from /v1/point.", "object", "what to point at, e.g. 'red circles'")
    p.add_argument("--draw", metavar="OUT.png", help="write a copy of the image with the points drawn")
    a = p.parse_args(argv)
    _check_image(p, a.image)

    def run() -> None:
        from clients.molmo_client import MolmoClient

        with MolmoClient(a.base_url, a.api_key, a.model, a.timeout) as c:
            answer = c.point_full(a.image, a.object, max_tokens=a.max_tokens)
        for pt in answer["points"]:
            print(f"x={pt.x:.1f} y={pt.y:.1f}  (x_norm={pt.x_norm:.4f} y_norm={pt.y_norm:.4f})")
        print(f"count: {answer['count']}\ntext: {answer['text']}")
        if a.draw:
            draw_points(a.image, answer["points"], a.draw)
            print(f"wrote {a.draw}")

    return _call("molmo point", run)


def chat(argv: list[str]) -> int:
    p = _parser("molmo chat", "Ask one question about IMAGE; the answer is streamed.", "question", "the question")
    a = p.parse_args(argv)
    _check_image(p, a.image)

    def run() -> None:
        from clients.molmo_client import MolmoClient

        with MolmoClient(a.base_url, a.api_key, a.model, a.timeout) as c:
            for piece in c.stream_chat(a.question, images=[a.image], max_tokens=a.max_tokens, temperature=0):
                if isinstance(piece, str):
                    print(piece, end="", flush=True)
                else:
                    print()
                    for pt in piece:
                        print(f"point: x={pt.x} y={pt.y}")
        print()

    return _call("molmo chat", run)
