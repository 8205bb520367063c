"""`molmo export --merge-lora`: a LoRA adapter merged into its base, as one full checkpoint.

    molmo export --merge-lora --model BASE --lora runs/mine/adapter --out merged/ [--dtype bfloat16]
    molmo serve --model merged/

The adapter is checked against the base (molmo_model.lora.read_adapter: files, PEFT fields,
module names, shapes) before anything is loaded; each adapted weight becomes W + (alpha/r) B A,
computed in float32, and the result is written in the served layout
(molmo_model.checkpoint.save_checkpoint, atomically) in `--dtype` (default: the base's
dtype) with the base's tokenizer files copied as they are and `lora_merge.json` saying what
was merged. Connector and ViT adapters, which vLLM does not serve as adapters, are served
this way. A bad input exits 2 with a message naming the problem.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja")  # fmt: skip


def export(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="molmo export", description="Write a full checkpoint from a base and a "
                                "LoRA adapter (--merge-lora).")  # fmt: skip
    p.add_argument("--merge-lora", action="store_true", help="merge --lora into --model (the only export)")
    p.add_argument("--model", required=True, metavar="BASE", help="the base checkpoint folder")
    p.add_argument("--lora", required=True, metavar="ADAPTER", help="the adapter folder (PEFT's)")
    p.add_argument("--out", required=True, metavar="DIR", help="the merged checkpoint's folder (new)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the written weights (default: the base's torch_dtype)")  # fmt: skip
    a = p.parse_args(argv)
    try:
        out = merge_to_checkpoint(Path(a.model), Path(a.lora), Path(a.out), a.dtype, a.merge_lora)
    except ValueError as e:  # AdapterError, CheckpointError and usage: the message names the problem
        print(f"molmo export: {e}", file=sys.stderr)
        return 2
    print(f"merged checkpoint: {out}")
    print(f"serve it:          molmo serve --model {out}")
    return 0


def merge_to_checkpoint(base: Path, adapter_dir: Path, out: Path, dtype: str | None, merge_lora: bool = True) -> Path:
    """Checks, merges and writes; raises ValueError (AdapterError, CheckpointError) naming the problem."""
    import torch

    from molmo_model.checkpoint import load_checkpoint, save_checkpoint
    from molmo_model.config import MolmoConfig
    from molmo_model.lora import merge_adapter, read_adapter

    if not merge_lora:
        raise ValueError("say what to export: --merge-lora (a LoRA adapter merged into its base)")
    if not (base / "config.json").is_file():
        raise ValueError(f"--model {base} is not a checkpoint folder (no config.json)")
    if out.resolve() in (base.resolve(), adapter_dir.resolve()):
        raise ValueError(f"--out {out} is the base or the adapter folder; choose a new folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not empty; choose a new folder or remove it")
    config = MolmoConfig.load(base)
    adapter = read_adapter(adapter_dir, config)  # before the weights are loaded
    model, _, _ = load_checkpoint(base, dtype=torch.float32, with_tokenizer=False)
    merge_adapter(model, adapter)
    record = {"base": str(base.resolve()), "adapter": str(adapter.path.resolve()), "rank": adapter.config.rank,
              "alpha": adapter.config.alpha, "targets": list(adapter.config.targets), "modules": len(adapter.modules)}  # fmt: skip
    extra = {"lora_merge.json": json.dumps(record, indent=2) + "\n"}
    for name in TOKENIZER_FILES:  # the base's own files, byte for byte
        if (base / name).is_file():
            extra[name] = (base / name).read_text()
    if (adapter.path / "train_config.json").is_file():
        extra["train_config.json"] = (adapter.path / "train_config.json").read_text()
    return save_checkpoint(model, out, tokenizer=None, dtype=dtype or config.torch_dtype, extra_files=extra)
