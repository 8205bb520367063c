"""The `molmo` command line.

    molmo init --preset tiny --out DIR      write a random-weight checkpoint
    molmo serve [--model DIR] ...           OpenAI-compatible server (server/)
    molmo train ...                         train with the paper's recipe (training/)
    molmo eval --model DIR ...              pointing / counting / clock accuracy (training/)

Subcommands of other packages are imported lazily, so `molmo init` needs no vLLM.
"""

from __future__ import annotations

import argparse
import importlib
import sys


def _init(argv: list[str]) -> int:
    from molmo_model.checkpoint import init_checkpoint
    from molmo_model.config import PRESETS

    p = argparse.ArgumentParser(prog="molmo init", description="Write a random-weight checkpoint.")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--std", type=float, default=0.02, help="init std of weight matrices")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a = p.parse_args(argv)
    out = init_checkpoint(a.preset, a.out, seed=a.seed, std=a.std, dtype=a.dtype)
    print(f"wrote {a.preset} checkpoint to {out}")
    return 0


# name -> (module, function taking argv); the function returns an exit code.
COMMANDS = {
    "init": ("molmo_model.cli", "_init"),
    "serve": ("server.cli", "serve"),
    "train": ("training.cli", "train"),
    "eval": ("training.cli", "evaluate"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module, fn = COMMANDS[argv[0]]
    return int(getattr(importlib.import_module(module), fn)(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
