"""Training data: the record type, the JSONL format, and the synthetic generators.

    records.py      `Example` (an image and all its annotations) and `Annotation`
    jsonl.py        the JSONL format for your own images: `JsonlDataset`, `write_jsonl`
    check.py        a JSONL file checked whole before a run builds its model (`check_jsonl`)
    synthetic/      PixMo-style shape scenes and clocks, generated from seeds

    python -m training.data OUT_DIR --split train --size 16    # write a synthetic split as JSONL
"""
