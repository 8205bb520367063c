"""`python -m training.data OUT_DIR`: write a synthetic split as JSONL + PNG images."""

from __future__ import annotations

import argparse

from training.data.synthetic import SPLITS, SyntheticConfig, write_synthetic_split


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic split as JSONL + PNG images.")
    parser.add_argument("out_dir")
    parser.add_argument("--split", default="train", choices=SPLITS)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--clock-fraction", type=float, default=0.2)
    args = parser.parse_args(argv)
    config = SyntheticConfig(clock_fraction=args.clock_fraction)
    path = write_synthetic_split(args.out_dir, args.split, args.size, config, args.start)
    print(f"wrote {args.size} examples to {path}")


if __name__ == "__main__":
    main()
