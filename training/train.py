"""The training loop: `train` = `setup`, then `train_step` (training/step.py) step after step.

    molmo train --preset demo-gpu                   # the demo model, 450 s on one GPU (models/molmo-demo)
    molmo train --preset demo                       # the same recipe on the CPU, ~45 min
    molmo train --config my_run.toml                # any TrainConfig (training/config.py)
    torchrun --nproc-per-node 2 -m training.cli train --config my_run.toml   # DDP / FSDP

`setup` builds (or resumes) everything a run works on: model and tokenizer, the extras the
config switches on (training/supervision.py), optimizer and schedule (training/recipe.py),
and the step-indexed batches (training/loader.py). The loop then takes one optimizer step
per global batch, logs (training/run_log.py), checkpoints (training/checkpointing.py), and
stops at `run.steps` or at the wall-time limit `run.time_limit_s`, read off an injected
`now` so tests can drive it. `finish` writes the final served model.

CUDA runs use bf16 autocast over fp32 master weights; CPU runs stay in fp32. Under torchrun
the model is wrapped in DDP (gloo on CPU, NCCL on CUDA) or sharded with FSDP2
(`run.parallel = "fsdp"`).

Outputs in `run.out_dir`: `log.jsonl` (one line per logged step), `loss.png`,
`checkpoints/step-NNNNNN/` (resumable, see training/checkpointing.py; a run in the same
out_dir resumes from the newest one exactly) and `model/` (the final served model, also
written to `run.export_dir` when set).

A LoRA run (`lora.rank` > 0, `molmo train --lora R`) freezes the `init_from` checkpoint
(in `lora.base_dtype`), wraps `lora.targets` in adapters (molmo_model/lora.py) whose A and B
are the only parameters the optimizer sees, prints their count and a memory estimate
(training/memory.py) before the first step, and ends with `adapter/` (PEFT's folder) instead
of `model/`.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from molmo_model.checkpoint import load_checkpoint
from molmo_model.config import MolmoConfig
from molmo_model.lora import AdapterError, add_lora, load_adapter_state, read_adapter
from molmo_model.model import MolmoForCausalLM
from molmo_model.preprocessing import MolmoPreprocessor
from molmo_model.tokenizer import MolmoTokenizer, build_tokenizer
from training.checkpointing import (
    TRAIN_CONFIG_FILE,
    config_file,
    full_state_dicts,
    latest_checkpoint,
    load_training_state,
    save_lora,
    save_served,
    save_training_checkpoint,
    unwrap,
)
from training.config import RunError, TrainConfig
from training.data.check import DataError, check_jsonl
from training.distributed import Dist, all_reduce_sum, setup_distributed
from training.loader import StepBatches
from training.memory import estimate_memory
from training.recipe import COMPONENTS, build_optimizer, init_from_scratch
from training.run_log import StepLog, eta_seconds, plot_losses, quick_eval
from training.step import train_step
from training.supervision import ExtraLoss


@dataclass
class Run:
    """Everything the loop works on, as `setup` made it."""

    cfg: TrainConfig
    d: Dist
    run_dir: Path
    fsdp: bool
    tokenizer: MolmoTokenizer
    config: MolmoConfig
    model: nn.Module  # wrapped in DDP or sharded with FSDP when distributed
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    losses: list[ExtraLoss]  # the extras' losses, in the order they add up
    batches: StepBatches
    loader: torch.utils.data.DataLoader
    autocast: contextlib.AbstractContextManager
    start: int  # the step this process starts after (0, or a resumed checkpoint's)
    log: StepLog


# ---------------------------------------------------------------- setup


def model_spec(cfg: TrainConfig) -> tuple[MolmoTokenizer, MolmoConfig]:
    """The tokenizer and model config of a run (an `init_from` checkpoint's own, with its
    tokenizer), without building the model."""
    if cfg.model.init_from is not None:
        source = Path(cfg.model.init_from)
        if not (source / "config.json").is_file():
            raise RunError(f"model.init_from: {source} is not a checkpoint folder (no config.json)")
        tokenizer = MolmoTokenizer.from_dir(source)
    else:
        tokenizer = build_tokenizer()
    return tokenizer, cfg.model.build(tokenizer.embedding_size)


def build_model(
    cfg: TrainConfig, resume_from: Path | None, spec: tuple[MolmoTokenizer, MolmoConfig] | None = None
) -> tuple[MolmoForCausalLM, MolmoTokenizer, MolmoConfig]:
    """The same fresh weights on every rank (same seed), or a checkpoint's. A LoRA run's
    model is `init_from`'s, frozen, with fresh adapters (or `resume_from`'s adapter)."""
    tokenizer, config = spec or model_spec(cfg)
    if cfg.lora.enabled:
        return with_lora(cfg, resume_from, tokenizer, config), tokenizer, config
    if resume_from is not None or cfg.model.init_from is not None:
        model, _, _ = load_checkpoint(resume_from or cfg.model.init_from, with_tokenizer=False)
        model.im_patch_id = tokenizer.im_patch_id
        model.config = config  # keeps spec overrides such as max_crops
        model.model.vision_backbone.geo = config.preprocess  # and image_mask_rule
    else:
        torch.manual_seed(cfg.run.seed)
        model = MolmoForCausalLM(config, im_patch_id=tokenizer.im_patch_id)
        if cfg.model.init == "scaled":
            init_from_scratch(model, seed=cfg.run.seed)
        else:
            model.init_weights(std=cfg.model.init_std, seed=cfg.run.seed)
    return model, tokenizer, config


def with_lora(cfg: TrainConfig, resume_from: Path | None, tokenizer: MolmoTokenizer,
              config: MolmoConfig) -> MolmoForCausalLM:  # fmt: skip
    """`init_from`'s weights in `lora.base_dtype`, frozen, its `lora.targets` wrapped in
    adapters drawn from the run's seed, or holding the adapter saved in `resume_from`."""
    dtype = torch.bfloat16 if cfg.lora.base_dtype == "bfloat16" else torch.float32
    model, _, _ = load_checkpoint(cfg.model.init_from, dtype=dtype, with_tokenizer=False)
    model.im_patch_id = tokenizer.im_patch_id
    model.config = config  # keeps spec overrides such as max_crops
    model.model.vision_backbone.geo = config.preprocess
    add_lora(model, cfg.lora.adapter(), seed=cfg.run.seed)  # adapters in float32: the master weights
    if resume_from is not None:
        try:
            adapter = read_adapter(resume_from, config)
        except AdapterError as e:
            raise RunError(f"cannot resume {resume_from}: {e}") from None
        load_adapter_state(model, adapter.tensors)
    return model


def trainable_summary(model: nn.Module, cfg: TrainConfig, batch_images: int, device: torch.device) -> str:
    """What a LoRA run trains and what it should need: the trainable parameter count (and its
    share of all), and training/memory.py's estimate for this config (with the CUDA runtime's
    overhead on a GPU)."""
    params = list(unwrap(model).parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    adapter = cfg.lora.adapter()
    head = (f"LoRA rank {adapter.rank} (alpha {adapter.alpha:g}, dropout {adapter.dropout:g}) on "
            f"{','.join(adapter.targets)}: {trainable:,} trainable parameters of {total:,} "
            f"({100 * trainable / total:.3f}%)")  # fmt: skip
    bf16 = cfg.run.precision == "bf16" or (cfg.run.precision == "auto" and device.type == "cuda")
    est = estimate_memory(unwrap(model).config, adapter, cfg.lora.base_dtype, batch_images, cfg.data.max_len,
                          bf16_autocast=bf16, grad_checkpointing=cfg.run.grad_checkpointing)  # fmt: skip
    if device.type != "cuda":
        est.overhead_bytes = 0
    return head + "\n" + est.describe()


def preflight(cfg: TrainConfig, preprocessor: MolmoPreprocessor, main: bool = True) -> Path | None:
    """Everything checked before the model is built; raises RunError (the CLI exits 2).
    The config's cross-section rules; the run folder: its newest checkpoint to resume (with
    `run.resume`, refused when the config changed since) or none there at all; every line
    and image of JSONL data (training/data/check.py), whose summary rank 0 prints.
    Returns the checkpoint to resume from."""
    try:
        cfg.check()
    except ValueError as e:
        raise RunError(str(e)) from None
    run_dir = Path(cfg.run.out_dir)
    newest = latest_checkpoint(run_dir)
    if newest is not None and not cfg.run.resume:
        raise RunError(f"{run_dir} holds the checkpoints of an earlier run (newest: {newest.name}); "
                       "continue it with --resume or choose another --out")  # fmt: skip
    if newest is not None:
        saved = json.loads((newest / TRAIN_CONFIG_FILE).read_text())
        changed = cfg.changes_from(saved)
        if changed:
            now = cfg.to_dict()
            diffs = [f"{k} ({_get(saved, k)!r} -> {_get(now, k)!r})" for k in changed]
            raise RunError(f"cannot resume {newest}: the config changed since it was saved: {'; '.join(diffs)}. "
                           "Resume with the same settings, or start a new run with another --out")  # fmt: skip
    for name in ("path", "val_path"):
        path = getattr(cfg.data, name) if cfg.data.source == "jsonl" else None
        if path:
            try:
                report = check_jsonl(path, preprocessor, cfg.data.max_len)
            except DataError as e:
                raise RunError(str(e)) from None
            if main:
                print(report.summary(cfg.data.max_len), flush=True)
    return newest


def _get(d: dict, dotted: str) -> object:
    section, key = dotted.split(".", 1)
    return d.get(section, {}).get(key)


def _shard_fsdp(model: MolmoForCausalLM) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for block in model.model.transformer.blocks:
        fully_shard(block)
    for block in model.model.vision_backbone.image_vit.transformer.resblocks:
        fully_shard(block)
    return fully_shard(model)


def _autocast(cfg: TrainConfig, d: Dist) -> contextlib.AbstractContextManager:
    bf16 = cfg.run.precision == "bf16" or (cfg.run.precision == "auto" and d.device.type == "cuda")
    if bf16:
        return torch.autocast(device_type=d.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_loader(batches: StepBatches, cfg: TrainConfig) -> torch.utils.data.DataLoader:
    """The step-indexed batches, rendered and packed ahead by `data.num_workers` processes."""
    return torch.utils.data.DataLoader(
        batches, batch_size=None, shuffle=False, num_workers=cfg.data.num_workers,
        collate_fn=lambda x: x, prefetch_factor=2 if cfg.data.num_workers else None,
        # Its own generator: the loader draws a worker seed on start, which must not move the
        # global RNG that dropout uses (a resumed run would then drift from an uninterrupted one).
        generator=torch.Generator().manual_seed(cfg.run.seed),
    )  # fmt: skip


def setup(cfg: TrainConfig) -> Run:
    """Joins the process group, builds or resumes model, extras and optimizer, and opens the data."""
    d = setup_distributed(cfg.run.device)
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    run_dir = Path(cfg.run.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fsdp = cfg.run.parallel == "fsdp" and d.enabled
    if cfg.lora.base_dtype == "bfloat16" and cfg.lora.enabled and cfg.run.precision == "auto" and d.device.type != "cuda":
        raise RunError("lora.base_dtype = 'bfloat16' runs under bf16 autocast, which run.precision = 'auto' "
                       f"turns on for CUDA only (this run is on {d.device.type}): set run.precision = 'bf16', "
                       "or keep lora.base_dtype = 'float32'")  # fmt: skip

    tokenizer, config = model_spec(cfg)
    preprocessor = MolmoPreprocessor(config.preprocess, tokenizer)
    resume_from = preflight(cfg, preprocessor, d.main)
    model, tokenizer, config = build_model(cfg, resume_from, (tokenizer, config))
    model.to(d.device).train()
    model.grad_checkpointing = cfg.run.grad_checkpointing
    extras = cfg.extras.build(cfg.data, preprocessor)
    losses = [loss for x in extras if (loss := x.bind(model, d.device, cfg.run.seed)) is not None]
    if losses and fsdp:
        names = ", ".join(f"extras.{x.name}" for x in losses)
        raise ValueError(f"{names} not supported with run.parallel = 'fsdp'")
    if fsdp:
        model = _shard_fsdp(model)
    heads = {x.name: x.head for x in losses if x.head is not None}
    optimizer, scheduler = build_optimizer(model, cfg.optim, cfg.run.steps, heads)

    start = 0
    if resume_from is not None:
        start = load_training_state(resume_from, model, optimizer, scheduler, d, fsdp, losses)
    else:
        # Dropout streams differ per rank; weights were drawn from the shared seed above.
        torch.manual_seed(cfg.run.seed * 1000 + d.rank + 1)
        random.seed(cfg.run.seed * 1000 + d.rank + 1)
        np.random.seed(cfg.run.seed * 1000 + d.rank + 1)
    if d.enabled and not fsdp:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)

    batches = StepBatches(cfg.data, preprocessor, config.preprocess.tokens_per_side**2, seed=cfg.run.seed,
                          rank=d.rank, world_size=d.world_size, start_step=start, end_step=cfg.run.steps,
                          extras=extras)  # fmt: skip
    log = StepLog(run_dir / "log.jsonl", write=d.main)
    if d.main:
        for name, text in config_file(cfg).items():
            (run_dir / name).write_text(text)
        log.drop_after(start)
        params = [] if fsdp else list(unwrap(model).parameters())
        n_params = sum(p.numel() for p in params if p.requires_grad)
        print(f"training {n_params or '?'} parameters on {d.world_size} x {d.device.type}, "
              f"steps {start}..{cfg.run.steps}, global batch {batches.global_batch} images, out {run_dir}")  # fmt: skip
        if cfg.lora.enabled:
            print(trainable_summary(model, cfg, cfg.data.batch_size, d.device), flush=True)
    return Run(cfg, d, run_dir, fsdp, tokenizer, config, model, optimizer, scheduler, losses, batches,
               make_loader(batches, cfg), _autocast(cfg, d), start, log)  # fmt: skip


# ---------------------------------------------------------------- wall time


def schedule_position_by_time(anchor: tuple[int, float], elapsed: float, limit: float, total: int) -> float:
    """The schedule step wall time calls for under `run.schedule_by_time`: the time left after
    `anchor` = (step, seconds into the loop), when wall time took over, maps linearly onto the
    steps left, so the decay ends at the time limit however fast the machine is."""
    step, at = anchor
    if at >= limit:
        return float(total)
    return step + (elapsed - at) / (limit - at) * (total - step)


class WallTime:
    """The loop's wall time, read off `now`: the time limit, and the LR schedule it drives."""

    def __init__(self, cfg: TrainConfig, start_step: int, now: Callable[[], float]) -> None:
        self.limit, self.by_time = cfg.run.time_limit_s, cfg.run.schedule_by_time and cfg.run.time_limit_s > 0
        self.total, self.now, self.started = cfg.run.steps, now, now()
        # The warmup goes by steps; wall time takes the schedule over after it.
        self.takeover = max(start_step, max(cfg.optim.warmup(c) for c in COMPONENTS))
        self.anchor: tuple[int, float] | None = None  # (step, seconds) where wall time took over

    def elapsed(self) -> float:
        return self.now() - self.started

    def push_schedule(self, step: int, elapsed: float, scheduler, d: Dist) -> None:
        """Moves the schedule at least as fast as the time left runs out (rank 0's wall time)."""
        if not self.by_time:
            return
        if self.anchor is None and step >= self.takeover:
            self.anchor = (step, elapsed)
        if self.anchor is not None:
            by_time = schedule_position_by_time(self.anchor, elapsed, self.limit, self.total)
            ahead = int(all_reduce_sum(float(d.main) * by_time, d))
            if ahead > scheduler.last_epoch:
                scheduler.last_epoch = min(ahead, self.total) - 1
                scheduler.step()

    def out_of_time(self, elapsed: float, d: Dist) -> bool:
        """Whether the limit has passed; every rank stops at the same step: rank 0's wall time decides."""
        return self.limit > 0 and all_reduce_sum(float(d.main and elapsed > self.limit), d) > 0


# ---------------------------------------------------------------- the loop


def log_step(run: Run, step: int, metrics: dict, elapsed: float) -> None:
    """Writes the row of `step` (with a quick held-out evaluation when one is due)."""
    cfg, d = run.cfg, run.d
    row = run.log.row(step, metrics, elapsed)
    if cfg.run.eval_every and step % cfg.run.eval_every == 0 and not run.fsdp:
        if d.main:
            row.update(quick_eval(unwrap(run.model), run.tokenizer, cfg))
        if d.enabled:
            dist.barrier()
    run.log.append(row)


def save_checkpoint(run: Run, step: int) -> None:
    """A resumable checkpoint of `step`, and the loss curve so far."""
    position = {"step": step, "images_seen": step * run.batches.global_batch}
    save_training_checkpoint(run.run_dir, step, run.model, run.optimizer, run.scheduler, run.tokenizer, run.cfg,
                             run.d, position, run.losses)  # fmt: skip
    if run.d.main:
        plot_losses(run.log.path, run.run_dir / "loss.png")


def finish(run: Run) -> Path:
    """Writes the final served model (in `run.save_dtype`) with how it was made; a LoRA run's
    final output is its adapter folder (`adapter/`), with the log and loss curve beside."""
    cfg, d = run.cfg, run.d
    if cfg.lora.enabled:
        return _finish_lora(run)
    model_state, _ = full_state_dicts(run.model, run.optimizer, run.fsdp)
    final = run.run_dir / "model"
    if d.main:
        files = config_file(cfg)
        save_served(model_state, run.config, run.tokenizer, final, cfg.run.save_dtype, files)
        if run.log.path.exists():
            shutil.copy(run.log.path, final / "log.jsonl")
            plot_losses(run.log.path, final / "loss.png")
        if cfg.run.export_dir:
            export = Path(cfg.run.export_dir)
            save_served(model_state, run.config, run.tokenizer, export, cfg.run.save_dtype, files)
            for name in ("log.jsonl", "loss.png"):
                if (final / name).exists():
                    shutil.copy(final / name, export / name)
    if d.enabled:
        dist.barrier()
        dist.destroy_process_group()
    return final


def _finish_lora(run: Run) -> Path:
    cfg, d = run.cfg, run.d
    final = run.run_dir / "adapter"
    if d.main:
        log = {"log.jsonl": run.log.path.read_text()} if run.log.path.exists() else {}
        for out in (final, Path(cfg.run.export_dir)) if cfg.run.export_dir else (final,):
            save_lora(run.model, cfg, out, log)
            plot_losses(run.log.path, out / "loss.png")
    if d.enabled:
        dist.barrier()
        dist.destroy_process_group()
    return final


def train(cfg: TrainConfig, now: Callable[[], float] = time.perf_counter) -> Path:
    """Runs (or resumes) a training run; returns the folder of the final served model. `now`
    reads the wall time (seconds) for the time limit, the schedule by time and the logged timings."""
    run = setup(cfg)
    bar = None
    if run.d.main and cfg.run.progress:
        from tqdm import tqdm

        # tqdm's own ETA counts steps; ours (`eta` in the postfix) also follows the time limit.
        bar = tqdm(total=cfg.run.steps, initial=run.start, desc="train", dynamic_ncols=True,
                   bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")  # fmt: skip
    wall = WallTime(cfg, run.start, now)
    step = run.start
    for micro_batches in run.loader:
        began = wall.elapsed()
        metrics = train_step(run.model, run.optimizer, run.scheduler, micro_batches, run.d, run.autocast,
                             cfg.optim.max_grad_norm, cfg.run.response_dropout, run.losses)  # fmt: skip
        step += 1
        elapsed = wall.elapsed()
        wall.push_schedule(step, elapsed, run.scheduler, run.d)
        run.log.add(elapsed - began, metrics)
        if bar is not None:
            bar.update(1)
            eta = eta_seconds(step - run.start, elapsed, cfg.run.steps - step, cfg.run.time_limit_s)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", eta=f"{int(eta) // 60}:{int(eta) % 60:02d}")
        out_of_time = wall.out_of_time(elapsed, run.d)
        # The last step of a run stopped by its time limit is logged and saved too.
        if step % cfg.run.log_every == 0 or step == cfg.run.steps or out_of_time:
            log_step(run, step, metrics, elapsed)
        if (cfg.run.save_every and step % cfg.run.save_every == 0) or step == cfg.run.steps or out_of_time:
            save_checkpoint(run, step)
        if out_of_time:
            if run.d.main:
                print(f"time limit of {cfg.run.time_limit_s:.0f} s reached at step {step}; "
                      "the run resumes from here when started again with the same output folder")  # fmt: skip
            break
    if bar is not None:
        bar.close()
    return finish(run)
