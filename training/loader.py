"""Deterministic batches: step number -> this rank's micro-batches.

Every optimizer step consumes a global batch of `batch_size * grad_accum * world_size`
images. Image j of step s is global position `s * G + j` of the data stream: for the
synthetic generator position p is example p (a fresh image per step, no epochs); a finite
dataset (JSONL) is walked in a permutation reshuffled every epoch from `seed + epoch`.
Rank r takes positions [r * B * A, (r + 1) * B * A) of the step, in A micro-batches of B.

Because a batch is a pure function of (step, rank), resuming at step s needs nothing but s,
and a 2-process run sees exactly the global batch of a 1-process run with twice the
per-device batch. `StepBatches` is a torch Dataset over steps, so a DataLoader's workers can
render and pack ahead of the training loop. The run's extras (training/supervision.py) may
rewrite each example before it is packed (seeded by its stream position) and attach their
targets to each packed sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from molmo_model.preprocessing import MolmoPreprocessor
from training.config import DataConfig
from training.data.jsonl import JsonlDataset
from training.data.synthetic import SyntheticDataset
from training.packing import Batch, collate, pack_example, split_annotations
from training.supervision import Extra


def make_dataset(cfg: DataConfig) -> Dataset:
    """The example source a DataConfig names."""
    if cfg.source == "jsonl":
        return JsonlDataset(cfg.path)
    return SyntheticDataset(cfg.split, cfg.size, cfg.synthetic())


class StepBatches(Dataset):
    """Item i = the micro-batches of step `start_step + i` for one rank."""

    def __init__(
        self,
        cfg: DataConfig,
        preprocessor: MolmoPreprocessor,
        tokens_per_crop: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        end_step: int = 1,
        extras: Sequence[Extra] = (),
    ) -> None:
        self.cfg, self.pre, self.tokens_per_crop = cfg, preprocessor, tokens_per_crop
        self.extras = tuple(extras)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.start_step, self.end_step = start_step, end_step
        self.dataset = make_dataset(cfg)
        self.n = len(self.dataset)
        if self.n == 0:
            raise ValueError("data: the dataset is empty")
        self._perm_epoch, self._perm = -1, None

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.world_size

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step)

    def position_to_index(self, position: int) -> int:
        """Dataset index at stream position `position` (permuted per epoch when shuffling a
        finite dataset; the synthetic stream is already random)."""
        epoch, offset = divmod(position, self.n)
        if not self.cfg.shuffle or self.cfg.source == "synthetic":
            return offset
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return int(self._perm[offset])

    def step_positions(self, step: int) -> list[list[int]]:
        """Stream positions of this rank's micro-batches at `step`."""
        b, a = self.cfg.batch_size, self.cfg.grad_accum
        first = step * self.global_batch + self.rank * b * a
        return [list(range(first + m * b, first + (m + 1) * b)) for m in range(a)]

    def micro_batch(self, positions: list[int]) -> list[Batch]:
        """The packed sequences of these stream positions as one padded batch or, with
        `max_batch_tokens`, as several length-sorted ones that pad less."""
        packed = []
        for p in positions:
            example = self.dataset[self.position_to_index(p)]
            for extra in self.extras:
                example = extra.prepare(example, self.seed, p)
            sources = [example] if self.cfg.pack else split_annotations(example)
            seqs = [pack_example(e, self.pre, self.cfg.max_len) for e in sources]
            for extra in self.extras:
                for seq, source in zip(seqs, sources, strict=True):
                    targets = extra.targets(source, seq)
                    if targets is not None:
                        seq.extras[extra.name] = targets
            packed.extend(seqs)
        groups = [packed]
        if self.cfg.max_batch_tokens:
            groups, budget = [[]], self.cfg.max_batch_tokens
            for seq in sorted(packed, key=lambda e: e.length):
                # Sorted by length, so the newest is the longest: padded size = n * its length.
                if groups[-1] and (len(groups[-1]) + 1) * seq.length > budget:
                    groups.append([])
                groups[-1].append(seq)
        return [collate(g, self.pre.tokenizer.pad_id, self.tokens_per_crop) for g in groups]

    def __getitem__(self, i: int) -> list[Batch]:
        step = self.start_step + i
        return [b for ps in self.step_positions(step) for b in self.micro_batch(ps)]
