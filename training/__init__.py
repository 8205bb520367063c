"""Training side of Molmo: data (synthetic generators, the JSONL loader) and, later, the trainer."""
