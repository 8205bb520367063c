"""The training loop: `train` -> `train_step` -> `forward_backward_step`, flat and explicit.

    molmo train --preset demo-gpu                   # the demo model, 450 s on one GPU (models/molmo-demo)
    molmo train --preset demo                       # the same recipe on the CPU, ~45 min
    molmo train --config my_run.toml                # any TrainConfig (training/config.py)
    torchrun --nproc-per-node 2 -m training.cli train --config my_run.toml   # DDP / FSDP

One step: this rank's micro-batches (training/loader.py, a pure function of the step) ->
all_reduce of their loss-token counts -> for each micro-batch a forward/backward whose
summed token loss is divided by the average number of loss tokens per device (so every
device's gradient has the same scale and DDP's mean gives the global token mean) ->
per-component gradient clipping -> AdamW step -> LR schedule step (training/recipe.py).

With `run.dense_loss` / `run.grounding_loss` (training/dense.py) the step adds a per-token
loss on the image features and an attention-grounding loss on the answers' coordinates, each
divided by its count per device like the token loss; their head and hooks live beside the
model and never reach the served checkpoint.

CUDA runs use bf16 autocast over fp32 master weights; CPU runs stay in fp32. Under torchrun
the model is wrapped in DDP (gloo on CPU, NCCL on CUDA) or sharded with FSDP2
(`run.parallel = "fsdp"`).

Outputs in `run.out_dir`: `log.jsonl` (one line per logged step), `loss.png`,
`checkpoints/step-NNNNNN/` (served layout: config.json, model.safetensors, tokenizer, plus
`training_state.pt` with optimizer, scheduler, step, RNG states and data position; a run in
the same out_dir resumes from the newest one exactly) and `model/` (the final served model,
also written to `run.export_dir` when set).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from molmo_model.checkpoint import load_checkpoint, save_checkpoint
from molmo_model.model import MolmoForCausalLM
from molmo_model.preprocessing import MolmoPreprocessor
from molmo_model.tokenizer import MolmoTokenizer, build_tokenizer
from training.config import TrainConfig
from training.dense import DenseHead, FeatureTap, GroundingLoss
from training.loader import StepBatches
from training.packing import Batch
from training.recipe import COMPONENTS, build_optimizer, clip_grad_norms, init_from_scratch

STATE_FILE = "training_state.pt"
TRAIN_CONFIG_FILE = "train_config.json"


@dataclass
class Dist:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str) -> Dist:
    """Joins the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local, dev)


def all_reduce_sum(value: float, d: Dist) -> float:
    if not d.enabled:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return float(t.item())


# ---------------------------------------------------------------- one step


@dataclass
class Supervision:
    """training.dense's extra losses during a run; a part is None when its weight is 0."""

    head: DenseHead | None = None  # dense per-token loss on the image features
    tap: FeatureTap | None = None  # the vision backbone's output, for the head
    dense_weight: float = 0.0
    grounding: GroundingLoss | None = None  # attention grounding of the coordinates
    grounding_weight: float = 0.0


def clock_schedule_position(anchor: tuple[int, float], now: float, limit: float, total: int) -> float:
    """The schedule step the clock calls for under `run.schedule_by_time`: the time left after
    `anchor` = (step, seconds into the loop), when the clock took over, maps linearly onto the
    steps left, so the decay ends at the time limit however fast the machine is."""
    step, at = anchor
    if at >= limit:
        return float(total)
    return step + (now - at) / (limit - at) * (total - step)


def forward_backward_step(
    model: nn.Module,
    batch: Batch,
    loss_normalizer: float,
    autocast: contextlib.AbstractContextManager,
    response_dropout: float = 0.0,
    extra: Supervision | None = None,
    extra_normalizers: tuple[float, float] = (1.0, 1.0),
) -> tuple[float, float, float]:
    """Forward and backward of one micro-batch; returns its summed token loss and, with
    `extra`, its summed dense and grounding losses (per image / per query). Those are divided
    by `extra_normalizers`: the step's images with dense targets and grounding queries, per
    device, as the token loss is by `loss_normalizer`."""
    dense_sum = grounding_sum = 0.0
    with autocast:
        out = model(**batch.model_inputs(), loss_normalizer=loss_normalizer,
                    response_dropout=response_dropout)  # fmt: skip
        loss = out.loss
        if extra is not None and extra.tap is not None and batch.images is not None:
            feats = extra.tap.take()
            if batch.dense is not None:
                term = extra.head(feats[batch.dense_crops], batch.dense)
                dense_sum = float(term.detach())
                loss = loss + extra.dense_weight * term / extra_normalizers[0]
        if extra is not None and extra.grounding is not None:
            if batch.grounding is not None:
                term = extra.grounding(batch.grounding, batch.position_ids, batch.segment_ids)
                grounding_sum = float(term.detach())
                loss = loss + extra.grounding_weight * term / extra_normalizers[1]
            extra.grounding.clear()
    loss.backward()
    return float(out.loss.detach()) * loss_normalizer, dense_sum, grounding_sum


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    micro_batches: list[Batch],
    d: Dist,
    cfg: TrainConfig,
    autocast: contextlib.AbstractContextManager,
    extra: Supervision | None = None,
) -> dict[str, Any]:
    """One optimizer step over this rank's micro-batches; returns the step's metrics."""
    # The paper's normaliser: the average number of loss tokens per device, over all devices.
    local_tokens = sum(b.n_loss_tokens for b in micro_batches)
    global_tokens = all_reduce_sum(local_tokens, d)
    normalizer = max(global_tokens / d.world_size, 1.0)
    counts = [0.0, 0.0]  # the extra losses' terms (dense images, grounding queries), all devices
    if extra is not None:
        counts = [
            all_reduce_sum(sum(0 if b.dense_crops is None else len(b.dense_crops) for b in micro_batches), d),
            all_reduce_sum(sum(0 if b.grounding is None else len(b.grounding) for b in micro_batches), d),
        ]
    extra_normalizers = (max(counts[0] / d.world_size, 1.0), max(counts[1] / d.world_size, 1.0))
    loss_sum, dense_sum, grounding_sum = 0.0, 0.0, 0.0
    for i, batch in enumerate(micro_batches):
        batch = batch.to(d.device)
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            sums = forward_backward_step(model, batch, normalizer, autocast, cfg.run.response_dropout,
                                         extra, extra_normalizers)  # fmt: skip
        loss_sum, dense_sum, grounding_sum = loss_sum + sums[0], dense_sum + sums[1], grounding_sum + sums[2]
    if extra is not None and extra.head is not None and d.enabled:
        for p in extra.head.parameters():  # the head is outside DDP: average its gradients here
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= d.world_size
    norms = clip_grad_norms(optimizer, cfg.optim.max_grad_norm)
    lrs = {g["component"]: g["lr"] for g in optimizer.param_groups}
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    metrics = {
        "loss": all_reduce_sum(loss_sum, d) / max(global_tokens, 1.0),
        "loss_tokens": int(global_tokens),
        "images": int(all_reduce_sum(sum(b.n_images for b in micro_batches), d)),
        "annotations": int(all_reduce_sum(sum(b.n_annotations for b in micro_batches), d)),
        "tokens": int(all_reduce_sum(sum(int((b.segment_ids >= 0).sum()) for b in micro_batches), d)),
        **{f"lr_{k}": v for k, v in lrs.items()},
        **{f"grad_norm_{k}": v for k, v in norms.items()},
    }
    if extra is not None and extra.head is not None:
        metrics["dense_loss"] = all_reduce_sum(dense_sum, d) / max(counts[0], 1.0)
    if extra is not None and extra.grounding is not None:
        metrics["grounding_loss"] = all_reduce_sum(grounding_sum, d) / max(counts[1], 1.0)
    return metrics


# ---------------------------------------------------------------- checkpoints


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool):
    """(model, optimizer) state dicts on CPU, gathered whole when sharded with FSDP."""
    if not fsdp:
        return unwrap(model).state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(model, optimizer, options=opts)


def unwrap(model: nn.Module) -> MolmoForCausalLM:
    return model.module if hasattr(model, "module") else model  # type: ignore[return-value]


def save_served(
    state: dict[str, torch.Tensor], config, tokenizer: MolmoTokenizer, out: Path, dtype: str,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Writes a served-layout checkpoint from a (full) state dict, atomically."""
    with torch.device("meta"):
        model = MolmoForCausalLM(config, im_patch_id=tokenizer.im_patch_id)
    model.load_state_dict({k: v.detach().cpu() for k, v in state.items()}, strict=True, assign=True)
    return save_checkpoint(model, out, tokenizer, dtype=dtype, extra_files=extra_files)


def save_training_checkpoint(
    run_dir: Path, step: int, model: nn.Module, optimizer, scheduler, tokenizer, cfg: TrainConfig,
    d: Dist, data_position: dict[str, int], dense_head: nn.Module | None = None,
) -> Path | None:
    """checkpoints/step-NNNNNN/: the served model (float32) + training_state.pt, written so
    that a folder holding training_state.pt is always complete."""
    fsdp = cfg.run.parallel == "fsdp" and d.enabled
    model_state, optim_state = full_state_dicts(model, optimizer, fsdp)
    rngs = [rng_state()]
    if d.enabled:
        rngs = [None] * d.world_size
        dist.all_gather_object(rngs, rng_state())
    out = run_dir / "checkpoints" / f"step-{step:06d}"
    if d.main:
        extra = {TRAIN_CONFIG_FILE: json.dumps(cfg.to_dict(), indent=2) + "\n"}
        save_served(model_state, unwrap(model).config, tokenizer, out, "float32", extra)
        state = {
            "step": step,
            "optimizer": optim_state,
            "scheduler": scheduler.state_dict(),
            "rng": rngs,
            "data": data_position,
            "world_size": d.world_size,
        }
        if dense_head is not None:  # training-only: never part of the served model
            state["dense_head"] = {k: v.detach().cpu() for k, v in dense_head.state_dict().items()}
        fd, tmp = tempfile.mkstemp(prefix=".state.", dir=out)
        os.close(fd)
        torch.save(state, tmp)
        os.replace(tmp, out / STATE_FILE)
        _prune(run_dir / "checkpoints", cfg.run.keep_checkpoints)
    if d.enabled:
        dist.barrier()
    return out if d.main else None


def _prune(folder: Path, keep: int) -> None:
    done = sorted(p for p in folder.glob("step-*") if (p / STATE_FILE).exists())
    for p in done[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete resumable checkpoint of a run, if any."""
    done = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if (p / STATE_FILE).exists())
    return done[-1] if done else None


# ---------------------------------------------------------------- the run


def _autocast(cfg: TrainConfig, d: Dist) -> contextlib.AbstractContextManager:
    bf16 = cfg.run.precision == "bf16" or (cfg.run.precision == "auto" and d.device.type == "cuda")
    if bf16:
        return torch.autocast(device_type=d.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _shard_fsdp(model: MolmoForCausalLM) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for block in model.model.transformer.blocks:
        fully_shard(block)
    for block in model.model.vision_backbone.image_vit.transformer.resblocks:
        fully_shard(block)
    return fully_shard(model)


def plot_losses(log_path: Path, out: Path) -> None:
    """loss.png from log.jsonl (matplotlib, Agg)."""
    if not log_path.exists():  # stopped before its first log row
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean per answer token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    evals = [r for r in rows if "eval_pointing_f1" in r]
    if evals:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in evals], [r["eval_pointing_f1"] for r in evals], "g.-", label="pointing F1")
        if any("eval_counting_accuracy" in r for r in evals):
            ax2.plot([r["step"] for r in evals], [r.get("eval_counting_accuracy", math.nan) for r in evals],
                     "m.-", label="counting acc.")  # fmt: skip
        ax2.set_ylim(0, 1)
        ax2.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _quick_eval(model: MolmoForCausalLM, tokenizer, cfg: TrainConfig) -> dict[str, float]:
    """Pointing F1 / counting accuracy on held-out validation images (reference generator)."""
    from training.evaluate import ReferenceEngine, held_out_queries, run_eval

    queries = held_out_queries(cfg.run.eval_examples, cfg.data.synthetic(), split="val",
                               tasks=("point", "count"))  # fmt: skip
    was_training = model.training
    report = run_eval(ReferenceEngine(model, tokenizer, max_new_tokens=200), queries)
    model.train(was_training)
    out = {}
    if "pointing" in report:
        out["eval_pointing_f1"] = report["pointing"]["f1"]
    if "counting" in report:
        out["eval_counting_accuracy"] = report["counting"]["accuracy"]
    return out


def train(cfg: TrainConfig) -> Path:
    """Runs (or resumes) a training run; returns the folder of the final served model."""
    d = setup_distributed(cfg.run.device)
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    run_dir = Path(cfg.run.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fsdp = cfg.run.parallel == "fsdp" and d.enabled

    # Model and tokenizer: the same fresh weights on every rank (same seed), or a checkpoint.
    resume_from = latest_checkpoint(run_dir) if cfg.run.resume else None
    if cfg.model.init_from is not None:
        tokenizer = MolmoTokenizer.from_dir(cfg.model.init_from)
    else:
        tokenizer = build_tokenizer()
    config = cfg.model.build(tokenizer.embedding_size)
    if resume_from is not None or cfg.model.init_from is not None:
        model, _, _ = load_checkpoint(resume_from or cfg.model.init_from, with_tokenizer=False)
        model.im_patch_id = tokenizer.im_patch_id
        model.config = config  # keeps spec overrides such as max_crops
    else:
        torch.manual_seed(cfg.run.seed)
        model = MolmoForCausalLM(config, im_patch_id=tokenizer.im_patch_id)
        if cfg.model.init == "scaled":
            init_from_scratch(model, seed=cfg.run.seed)
        else:
            model.init_weights(std=cfg.model.init_std, seed=cfg.run.seed)
    model.to(d.device).train()
    extra, dense_vocab = None, None
    if cfg.run.dense_loss > 0 or cfg.run.grounding_loss > 0:
        if fsdp:
            raise ValueError("run.dense_loss and run.grounding_loss are not supported with run.parallel = 'fsdp'")
        extra = Supervision()
    if cfg.run.dense_loss > 0:
        scene = cfg.data.synthetic().scene
        dense_vocab = (scene.kinds, scene.colours)
        torch.manual_seed(cfg.run.seed + 7)
        extra.head = DenseHead(config.llm.hidden_size, len(scene.kinds), len(scene.colours),
                               cfg.run.dense_object_attributes).to(d.device)  # fmt: skip
        extra.tap, extra.dense_weight = FeatureTap(model.model.vision_backbone), cfg.run.dense_loss
    if cfg.run.grounding_loss > 0:
        extra.grounding = GroundingLoss(model, cfg.run.grounding_layers)
        extra.grounding_weight = cfg.run.grounding_loss
    head = extra.head if extra is not None else None
    if fsdp:
        model = _shard_fsdp(model)
    optimizer, scheduler = build_optimizer(model, cfg.optim, cfg.run.steps, head)

    start = 0
    if resume_from is not None:
        state = torch.load(resume_from / STATE_FILE, map_location="cpu", weights_only=False)
        if fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_optimizer_state_dict,
            )

            set_optimizer_state_dict(model, optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))  # fmt: skip
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if head is not None:
            if "dense_head" not in state:
                raise ValueError(f"{resume_from} was saved without run.dense_loss; resume it without")
            head.load_state_dict(state["dense_head"])
        start = int(state["step"])
        if state.get("world_size") == d.world_size:
            set_rng_state(state["rng"][d.rank])
        elif d.main:
            print(f"resuming on {d.world_size} processes from a {state.get('world_size')}-process run: "
                  "RNG streams restart")  # fmt: skip
    else:
        # Dropout streams differ per rank; weights were drawn from the shared seed above.
        torch.manual_seed(cfg.run.seed * 1000 + d.rank + 1)
        random.seed(cfg.run.seed * 1000 + d.rank + 1)
        np.random.seed(cfg.run.seed * 1000 + d.rank + 1)
    if d.enabled and not fsdp:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)

    preprocessor = MolmoPreprocessor(config.preprocess, tokenizer)
    batches = StepBatches(cfg.data, preprocessor, config.preprocess.tokens_per_side**2, seed=cfg.run.seed,
                          rank=d.rank, world_size=d.world_size, start_step=start, end_step=cfg.run.steps,
                          dense=dense_vocab,
                          grounding=tokenizer.im_patch_id if cfg.run.grounding_loss > 0 else None,
                          grounding_lead=cfg.run.grounding_lead,
                          grounding_start=cfg.run.grounding_start)  # fmt: skip
    loader = torch.utils.data.DataLoader(
        batches, batch_size=None, shuffle=False, num_workers=cfg.data.num_workers,
        collate_fn=lambda x: x, prefetch_factor=2 if cfg.data.num_workers else None,
        # Its own generator: the loader draws a worker seed on start, which must not move the
        # global RNG that dropout uses (a resumed run would then drift from an uninterrupted one).
        generator=torch.Generator().manual_seed(cfg.run.seed),
    )  # fmt: skip
    autocast = _autocast(cfg, d)
    log_path = run_dir / "log.jsonl"
    if d.main:
        (run_dir / TRAIN_CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        if log_path.exists():  # drop lines a crashed run wrote after its last checkpoint
            rows = [r for r in log_path.read_text().splitlines() if r.strip() and json.loads(r)["step"] <= start]
            log_path.write_text("".join(r + "\n" for r in rows))
        n_params = sum(p.numel() for p in unwrap(model).parameters()) if not fsdp else None
        print(f"training {n_params or '?'} parameters on {d.world_size} x {d.device.type}, "
              f"steps {start}..{cfg.run.steps}, global batch {batches.global_batch} images, out {run_dir}")  # fmt: skip

    bar = None
    if d.main and cfg.run.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.run.steps, initial=start, desc="train", dynamic_ncols=True)
    t_start, window = time.perf_counter(), []
    warmup_steps = max(cfg.optim.warmup(c) for c in COMPONENTS)
    clock_anchor: tuple[int, float] | None = None  # (step, seconds) where the clock takes over
    step = start
    for micro_batches in loader:
        t0 = time.perf_counter()
        metrics = train_step(model, optimizer, scheduler, micro_batches, d, cfg, autocast, extra)
        step += 1
        if cfg.run.schedule_by_time and cfg.run.time_limit_s > 0:
            # The warmup goes by steps; after it, rank 0's clock (as for the limit) moves the
            # schedule at least as fast as the time left runs out.
            now = time.perf_counter() - t_start
            if clock_anchor is None and step >= max(start, warmup_steps):
                clock_anchor = (step, now)
            if clock_anchor is not None:
                by_clock = clock_schedule_position(clock_anchor, now, cfg.run.time_limit_s, cfg.run.steps)
                ahead = int(all_reduce_sum(float(d.main) * by_clock, d))
                if ahead > scheduler.last_epoch:
                    scheduler.last_epoch = min(ahead, cfg.run.steps) - 1
                    scheduler.step()
        window.append((time.perf_counter() - t0, metrics))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
        # Every rank stops at the same step: rank 0's clock decides.
        out_of_time = cfg.run.time_limit_s > 0 and all_reduce_sum(
            float(d.main and time.perf_counter() - t_start > cfg.run.time_limit_s), d
        ) > 0
        # The last step of a run stopped by the clock is logged too.
        if step % cfg.run.log_every == 0 or step == cfg.run.steps or out_of_time:
            seconds = sum(w[0] for w in window)
            row = {
                "step": step,
                **metrics,
                "steps_per_s": len(window) / seconds,
                "images_per_s": sum(w[1]["images"] for w in window) / seconds,
                "tokens_per_s": sum(w[1]["tokens"] for w in window) / seconds,
                "elapsed_s": time.perf_counter() - t_start,
            }
            window = []
            if cfg.run.eval_every and step % cfg.run.eval_every == 0 and not fsdp:
                if d.main:
                    row.update(_quick_eval(unwrap(model), tokenizer, cfg))
                if d.enabled:
                    dist.barrier()
            if d.main:
                with log_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
        if (cfg.run.save_every and step % cfg.run.save_every == 0) or step == cfg.run.steps or out_of_time:
            position = {"step": step, "images_seen": step * batches.global_batch}
            save_training_checkpoint(run_dir, step, model, optimizer, scheduler, tokenizer, cfg, d, position,
                                     head)  # fmt: skip
            if d.main:
                plot_losses(log_path, run_dir / "loss.png")
        if out_of_time:
            if d.main:
                print(f"time limit of {cfg.run.time_limit_s:.0f} s reached at step {step}; "
                      "the run resumes from here if started again with a larger limit")  # fmt: skip
            break
    if bar is not None:
        bar.close()

    # The final served model (in the requested dtype), with how it was made.
    model_state, _ = full_state_dicts(model, optimizer, fsdp)
    final = run_dir / "model"
    if d.main:
        extra = {TRAIN_CONFIG_FILE: json.dumps(cfg.to_dict(), indent=2) + "\n"}
        save_served(model_state, config, tokenizer, final, cfg.run.save_dtype, extra)
        if log_path.exists():
            shutil.copy(log_path, final / "log.jsonl")
            plot_losses(log_path, final / "loss.png")
        if cfg.run.export_dir:
            export = Path(cfg.run.export_dir)
            save_served(model_state, config, tokenizer, export, cfg.run.save_dtype, extra)
            for name in ("log.jsonl", "loss.png"):
                if (final / name).exists():
                    shutil.copy(final / name, export / name)
    if d.enabled:
        dist.barrier()
        dist.destroy_process_group()
    return final
