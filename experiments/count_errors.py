"""Why counting answers go wrong: each wrong count of an eval report, sorted by its cause.

Reads the answers that `molmo eval ... --answers` keeps (a report per model; the first is
the baseline) and sorts every counting query with 1 to 10 objects:

- `right`: the stated count is the true one;
- `skipped`: short, every point on its own true object, but an object left out between
  them (the model passed it in the top-down, left-right order and never went back);
- `stopped_early`: short, the points are exactly the first objects in order;
- `false_points`: some point lies on no object of the query (a wrong object or nowhere);
- `duplicates`: no false point, but two points on one object;
- `other`: the rest (a stated number that disagrees with the points, for one).

It also reports accuracy by true count and how many of the true objects no point found have
another true object in their row (centres within `training.extras.recovery.ROW` of the image
height), the ones an order slip loses, beside the same share over all true objects.

With `--checkpoint` (a training checkpoint of the report's model, one per report, which keeps
the dense head of `run.dense_loss`), it also reads, for every false point that lies on another
object of the scene, the dense head's kind of that object from the image tokens under it:
whether the image features still say what the object is (the LLM chose it anyway) or not.

The committed reports (experiments/results/eval_reports/, models/molmo-demo/eval_report.json)
are summaries without the answers; write reports to read here with `molmo eval ... --answers
--out REPORT` (the command of each is in experiments/README.md). Writes
experiments/results/count_errors.json/.csv, or OUT.json/.csv with `--out OUT`.

    python experiments/count_errors.py runs/eval/demo_L4.json runs/eval/demo_gpu_A.json
    python experiments/count_errors.py REPORT --checkpoint runs/demo/checkpoints/step-003000
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from benchmarks.report import EXPERIMENT_RESULTS, write_results  # noqa: E402
from molmo_model.points import parse_points, reading_order  # noqa: E402
from training.config import DEMO_SCENE  # noqa: E402
from training.data.records import inside  # noqa: E402
from training.evaluate import COUNT_RANGE, parse_count  # noqa: E402
from training.extras.recovery import ROW  # noqa: E402

CAUSES = ("right", "skipped", "stopped_early", "false_points", "duplicates", "other")


def _image_size(answer: dict) -> tuple[int, int]:
    """The answer's image size; reports from before `image_size` was kept are demo scenes."""
    return tuple(answer.get("image_size") or (DEMO_SCENE["width_range"][0], DEMO_SCENE["height_range"][0]))


def classify(answer: dict) -> tuple[str, list[int]]:
    """The cause of one counting answer and the indices of the true objects no point found."""
    width, height = _image_size(answer)
    boxes, true = answer["boxes"], answer["count"]
    points = [(p.x, p.y) for p in parse_points(answer["answer"], width, height)]
    hits = [next((i for i, b in enumerate(boxes) if inside(p, b)), None) for p in points]
    found = {h for h in hits if h is not None}
    missed = [i for i in range(len(boxes)) if i not in found]
    stated = parse_count(answer["answer"])
    if stated == true:
        return "right", missed
    if any(h is None for h in hits):
        return "false_points", missed
    if len(found) < len(hits):
        return "duplicates", missed
    if stated != len(points) or stated > true:
        return "other", missed
    # The order the training answers list the objects in: their centres as format_points writes them.
    centre = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in boxes]
    order = reading_order(centre, width, height)
    return ("stopped_early" if found == set(order[: len(found)]) else "skipped"), missed


def dense_read_of_false_objects(report: dict, checkpoint: Path) -> dict[str, int]:
    """For the false points of wrong counts that lie on another object: does the dense head
    read that object's kind right, or as the kind the question asked for?"""
    import torch

    from experiments.checkpoints import load_for_diagnosis
    from molmo_model.preprocessing import MolmoPreprocessor
    from training.data.synthetic import make_example
    from training.extras.dense import global_token_centres
    from training.packing import collate, pack_example

    model, tok, cfg, head, tap = load_for_diagnosis(checkpoint)
    if head is None:
        raise SystemExit(f"{checkpoint} has no dense head (trained without run.dense_loss)")
    syn, geo = cfg.data.synthetic(), model.config.preprocess
    kinds = syn.scene.kinds
    pre = MolmoPreprocessor(geo, tok)
    reads: collections.Counter = collections.Counter()
    lo, hi = COUNT_RANGE
    for a in report["answers"]:
        if a["task"] != "count" or not lo <= a["count"] <= hi or classify(a)[0] != "false_points":
            continue
        ex = make_example(a["split"], a["index"], syn)
        batch = collate([pack_example(ex, pre, cfg.data.max_len)], tok.pad_id, geo.tokens_per_side**2)
        with torch.no_grad():
            model(**batch.model_inputs())
            kind_logits = head.read_out(tap.take()[0])[0]  # crop 0 = the global view
        centres = global_token_centres(*ex.image.size, geo).tolist()
        asked = next((k for k in kinds if k in a["question"]), None)
        for p in parse_points(a["answer"], *ex.image.size):
            if any(inside((p.x, p.y), b) for b in a["boxes"]):
                continue
            obj = next((o for o in ex.metadata["objects"] if inside((p.x, p.y), o["box"])), None)
            under = [i for i, c in enumerate(centres) if obj is not None and inside(c, obj["box"])]
            if not under:
                reads["background_or_no_token"] += 1
                continue
            read = kinds[int(kind_logits[under].softmax(-1).mean(0).argmax()) - 1]
            reads["true_kind" if read == obj["kind"] else "asked_kind" if read == asked else "other_kind"] += 1
    return dict(reads)


def summarize(path: Path, checkpoint: Path | None = None) -> dict:
    report = json.loads(path.read_text())
    lo, hi = COUNT_RANGE
    rows = [a for a in report.get("answers", []) if a["task"] == "count" and lo <= a["count"] <= hi]
    if not rows:
        raise SystemExit(f"{path}: no counting answers with {lo}-{hi} objects (run molmo eval with --answers)")
    causes, by_count, right_by_count = collections.Counter(), collections.Counter(), collections.Counter()
    missed_total, missed_in_row, objects, objects_in_row = 0, 0, 0, 0
    for a in rows:
        cause, missed = classify(a)
        causes[cause] += 1
        by_count[a["count"]] += 1
        right_by_count[a["count"]] += cause == "right"
        height = _image_size(a)[1]
        ys = [(b[1] + b[3]) / 2 for b in a["boxes"]]
        in_row = [any(j != i and abs(ys[j] - ys[i]) <= ROW * height for j in range(len(ys))) for i in range(len(ys))]
        objects, objects_in_row = objects + len(ys), objects_in_row + sum(in_row)
        missed_total, missed_in_row = missed_total + len(missed), missed_in_row + sum(in_row[i] for i in missed)
    n = len(rows)
    extra = {} if checkpoint is None else {
        "checkpoint": str(checkpoint), "dense_read_of_false_objects": dense_read_of_false_objects(report, checkpoint)}  # fmt: skip
    return {
        "report": str(path),
        "model": report.get("model"),
        "engine": report.get("engine"),
        "queries": n,
        "accuracy": causes["right"] / n,
        "causes": {c: causes[c] for c in CAUSES},
        "accuracy_by_count": {k: round(right_by_count[k] / by_count[k], 3) for k in sorted(by_count)},
        "queries_by_count": {k: by_count[k] for k in sorted(by_count)},
        "missed_objects": missed_total,
        "missed_with_a_row_neighbour": missed_in_row,
        "objects": objects,
        "objects_with_a_row_neighbour": objects_in_row,
        "machine_of_report": report.get("machine"),
        **extra,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", type=Path, help="eval reports with answers; the first is the baseline")
    ap.add_argument("--checkpoint", action="append", type=Path, default=[],
                    help="the training checkpoint of each report's model, in order (see above)")
    ap.add_argument("--out", type=Path, default=EXPERIMENT_RESULTS / "count_errors", help="writes OUT.json and OUT.csv")
    args = ap.parse_args()
    if args.checkpoint and len(args.checkpoint) != len(args.reports):
        ap.error("give one --checkpoint per report, or none")
    results = [summarize(p, c) for p, c in zip(args.reports, args.checkpoint or [None] * len(args.reports), strict=True)]
    write_results(args.out.stem, results, meta={"baseline": str(args.reports[0])}, out_dir=args.out.parent)
    for r in results:
        print(f"{r['report']}: accuracy {r['accuracy']:.3f} over {r['queries']}; "
              + ", ".join(f"{c} {r['causes'][c]}" for c in CAUSES)
              + f"; missed objects {r['missed_objects']}, {r['missed_with_a_row_neighbour']} with a row neighbour"
              + f" (of all objects {r['objects']}, {r['objects_with_a_row_neighbour']})")  # fmt: skip
        print("  by count: " + " ".join(f"{k}:{v:.2f}" for k, v in r["accuracy_by_count"].items()))
        if "dense_read_of_false_objects" in r:
            print(f"  dense head on the objects of false points: {r['dense_read_of_false_objects']}")


if __name__ == "__main__":
    main()
