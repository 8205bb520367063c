"""The `molmo` command line: one umbrella above the packages it dispatches to.

    molmo init --preset tiny --out DIR      write a random-weight checkpoint (molmo_model;
                                            --preset molmo2-tiny: a Molmo 2 one)
    molmo serve [--model DIR] ...           OpenAI-compatible server (server/)
    molmo train ...                         train with the paper's recipe (training/)
    molmo eval --model DIR ...              pointing / counting / clock accuracy (training/)
    molmo export --merge-lora ...           a LoRA adapter merged into a full checkpoint (molmo_model)
    molmo bench serve|compare ...           load benchmark of any endpoint (molmo_bench/)
    molmo point IMAGE "red circles"         points from a running server (clients/)
    molmo chat IMAGE "question"             one streamed answer from a running server
    molmo quantize --model DIR --out DIR    int4 weight-only copy, GPTQ layout (molmo_model)

Also `python -m molmo_cli ...` (for torchrun: `torchrun --nproc-per-node 2 -m molmo_cli train
...`). Each subcommand imports its package when it runs, so `molmo init` needs no vLLM.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def _init(argv: list[str]) -> int:
    from molmo_model.checkpoint import init_checkpoint
    from molmo_model.config import PRESETS

    p = argparse.ArgumentParser(prog="molmo init", description="Write a random-weight checkpoint.")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS) + ["molmo2-tiny", "molmo2-o-tiny"],
                   help="a Molmo preset, or molmo2-tiny / molmo2-o-tiny (Molmo 2's layout with "
                        "a Qwen3 / OLMo 3 decoder, our small tokenizer)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--std", type=float, default=0.02, help="init std of weight matrices")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a = p.parse_args(argv)
    out = init_checkpoint(a.preset, a.out, seed=a.seed, std=a.std, dtype=a.dtype)
    print(f"wrote {a.preset} checkpoint to {out}")
    return 0


def _serve(argv: list[str]) -> int:
    from server.cli import serve

    return serve(argv)


def _train(argv: list[str]) -> int:
    from training.cli import train

    return train(argv)


def _eval(argv: list[str]) -> int:
    from training.cli import evaluate

    return evaluate(argv)


def _export(argv: list[str]) -> int:
    from molmo_cli.export import export

    return export(argv)


def _bench(argv: list[str]) -> int:
    from molmo_bench.cli import bench

    return bench(argv)


def _point(argv: list[str]) -> int:
    from molmo_cli.by_hand import point

    return point(argv)


def _chat(argv: list[str]) -> int:
    from molmo_cli.by_hand import chat

    return chat(argv)


def _quantize(argv: list[str]) -> int:
    from molmo_model.quantize import DTYPES, QuantSpec, quantize_checkpoint

    p = argparse.ArgumentParser(
        prog="molmo quantize",
        description="Write a 4-bit weight-only copy of a checkpoint (the decoder blocks' linear "
        "layers, round-to-nearest, GPTQ's layout: vLLM serves it on CPU and GPU).",
    )
    p.add_argument("--model", required=True, help="checkpoint folder to quantize")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--bits", type=int, default=4, help="weight bits (4 only)")
    p.add_argument("--group-size", type=int, default=128,
                   help="input columns per scale: 32, 64, 128, or -1 (one per output channel)")  # fmt: skip
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES),
                   help="dtype of the scales and of every tensor left unquantized")  # fmt: skip
    a = p.parse_args(argv)
    try:
        out = quantize_checkpoint(a.model, a.out, QuantSpec(a.bits, a.group_size), a.dtype)
    except ValueError as e:
        print(f"molmo quantize: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote int{a.bits} checkpoint (group size {a.group_size}) to {out}")
    return 0


# name -> function taking argv and returning an exit code
COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "init": _init,
    "serve": _serve,
    "train": _train,
    "eval": _eval,
    "export": _export,
    "bench": _bench,
    "point": _point,
    "chat": _chat,
    "quantize": _quantize,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    return int(COMMANDS[argv[0]](argv[1:]) or 0)
