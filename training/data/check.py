"""Checks your JSONL data before a run builds its model, and reports what will not be trained.

`check_jsonl(path, preprocessor, max_len)` reads every line (the schema of
training/data/jsonl.py), opens every image (its size), checks that every point lies inside
its image, builds the answers written from points, and tokenizes every annotation against
the image's token count to find those that `data.max_len` cannot hold: packing
(training/packing.py) drops whole annotations that do not fit after the earlier ones and
cuts the first one if it alone is too long. The first problem raises `DataError`, whose
message names `file:line: field: problem`; `molmo train` prints it and exits 2. A clean file
gives a `DataReport` whose `summary()` the run prints (with the dropped annotations, by
line, when there are any).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from molmo_model.preprocessing import MolmoPreprocessor
from training.data.jsonl import load_record, read_jsonl
from training.packing import annotation_tokens, pack_tokens


class DataError(ValueError):
    """A problem in the user's data files; the message names file:line:field."""


@dataclass
class DataReport:
    """What a checked JSONL file holds and what packing will leave out of it."""

    path: Path
    images: int = 0
    annotations: int = 0
    dropped: list[tuple[int, int]] = field(default_factory=list)  # (line, annotation index) left out
    truncated: list[tuple[int, int]] = field(default_factory=list)  # (line, index): cut to fit

    def summary(self, max_len: int, shown: int = 5) -> str:
        """One line for a clean file; with dropped or cut annotations, their count and where."""
        text = f"data {self.path}: {self.images} images, {self.annotations} annotations"
        for what, items in (("dropped", self.dropped), ("cut short", self.truncated)):
            if items:
                where = ", ".join(f"{self.path.name}:{line} annotations[{i}]" for line, i in items[:shown])
                more = f" and {len(items) - shown} more" if len(items) > shown else ""
                text += (f"\n  {len(items)} of {self.annotations} annotations {what}: they do not fit in "
                         f"data.max_len={max_len} tokens after the image and the annotations before them "
                         f"({where}{more}); raise --max-len or split those images' annotations")  # fmt: skip
        return text


def check_jsonl(path: str | Path, preprocessor: MolmoPreprocessor, max_len: int) -> DataReport:
    """Validates a JSONL file completely (see the module docstring); raises DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such JSONL file")
    try:
        records = read_jsonl(path)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except ValueError as e:
        raise DataError(str(e)) from None
    if not records:
        raise DataError(f"{path}: no examples (the file has no non-blank line)")
    report = DataReport(path)
    tok = preprocessor.tokenizer
    for record in records:
        try:
            example = load_record(record)
        except ValueError as e:
            raise DataError(str(e)) from None
        width, height = example.image.size
        prefix = 1 + preprocessor.image_token_count(width, height)  # BOS + the image tokens
        if max_len < prefix + 2:
            raise DataError(f"{path}:{record.line}: image: its {width}x{height} pixels take {prefix} tokens, "
                            f"more than data.max_len={max_len} leaves room for; raise --max-len")  # fmt: skip
        tokens = [annotation_tokens(a, tok) for a in example.annotations]
        _, kept, _ = pack_tokens([tok.pad_id] * prefix, tokens, max_len)
        report.images += 1
        report.annotations += len(tokens)
        report.dropped += [(record.line, i) for i in range(len(tokens)) if i not in kept]
        if len(tokens[0][0]) > max_len - prefix:
            report.truncated.append((record.line, 0))
    return report
