"""Where a model points well and where it does not: `molmo eval --answers` reports split by
the picture's aspect ratio and by how large its objects are once the image is resized into the
model's crop.

The demo model sees a picture at `--crop-px` (224) on its longer side (max_crops 1), so an
object's side in that crop is its side in pixels times crop / longer side: a 30 px object in
an 800 px wide picture is 8 px there, under one 14 px patch. For each renderer of each report
(the training generator's at the top level, the independent renderer's under "independent"),
pointing F1 and counting accuracy (1-10 objects) per group, scored as `molmo eval` scores.

    molmo eval --model runs/demo-robust/model --examples 600 --tasks point,count --answers \
        --dtype float32 --out runs/eval/robust.json
    python experiments/robustness.py runs/eval/robust.json --out experiments/results/robustness_cpu
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import json  # noqa: E402

from PIL import Image  # noqa: E402

from benchmarks.report import EXPERIMENT_RESULTS, write_results  # noqa: E402
from training.evaluate import Query, score  # noqa: E402

ASPECT = ((1.3, "aspect < 1.3"), (2.0, "aspect 1.3-2"), (float("inf"), "aspect >= 2"))
OBJECT = ((10.0, "object < 10 px"), (16.0, "object 10-16 px"), (float("inf"), "object >= 16 px"))


def _bucket(value: float, edges: tuple[tuple[float, str], ...]) -> str:
    return next(label for edge, label in edges if value < edge)


def groups(answer: dict, crop_px: int) -> tuple[str, str]:
    """(aspect-ratio group, object-size group) of one answered query; a query without objects
    is grouped by its picture only ("no object")."""
    w, h = answer["image_size"]
    sides = [min(b[2] - b[0], b[3] - b[1]) for b in answer["boxes"]]
    size = _bucket(min(sides) * crop_px / max(w, h), OBJECT) if sides else "no object"
    return _bucket(max(w, h) / min(w, h), ASPECT), size


def breakdown(answers: list[dict], crop_px: int) -> list[dict]:
    images: dict[tuple[int, int], Image.Image] = {}  # score() reads only the size
    rows = []
    for axis in (0, 1):
        grouped: dict[str, list[dict]] = {}
        for a in answers:
            grouped.setdefault(groups(a, crop_px)[axis], []).append(a)
        for label, items in sorted(grouped.items()):
            queries = []
            for a in items:
                size = tuple(a["image_size"])
                image = images.setdefault(size, Image.new("RGB", size))
                queries.append(
                    Query(
                        a["task"], a["question"], image, [tuple(b) for b in a["boxes"]], a["count"]
                    )
                )
            s = score(queries, [a["answer"] for a in items])
            rows.append({"group": label, "queries": len(items),
                         "pointing_f1": s.get("pointing", {}).get("f1"),
                         "counting_accuracy": s.get("counting", {}).get("accuracy"),
                         "counting_queries": s.get("counting", {}).get("queries")})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "reports", nargs="+", type=Path, help="molmo eval reports written with --answers"
    )
    ap.add_argument("--crop-px", type=int, default=224, help="the model's crop side (pixels)")
    ap.add_argument("--out", type=Path, default=EXPERIMENT_RESULTS / "robustness")
    args = ap.parse_args()
    rows = []
    for path in args.reports:
        report = json.loads(path.read_text())
        for renderer, part in (("own", report), ("independent", report.get("independent"))):
            if part and part.get("answers"):
                label = "independent" if report.get("renderer") == "independent" else renderer
                for row in breakdown(part["answers"], args.crop_px):
                    rows.append({"report": path.name, "renderer": label, **row})
                    print(f"{path.name:24} {label:12} {row['group']:18} {row['queries']:5} "
                          f"F1 {row['pointing_f1']:.3f}  counting {row['counting_accuracy']:.3f}")  # fmt: skip
    if not rows:
        raise SystemExit(
            "robustness.py: no report holds answers (write them with molmo eval --answers)"
        )
    write_results(args.out.stem, rows, meta={"reports": [str(p) for p in args.reports],
                                             "crop_px": args.crop_px}, out_dir=args.out.parent)  # fmt: skip


if __name__ == "__main__":
    main()
