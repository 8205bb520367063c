"""Training checkpoints: written atomically, resumed exactly.

`checkpoints/step-NNNNNN/` holds the served layout (config.json, model.safetensors,
tokenizer, `train_config.json`) in float32 plus `training_state.pt`: optimizer, scheduler,
step, every rank's RNG states, the data position, the world size and, for each extra loss
with a head (training/supervision.py), `{name}_head`. A folder holding training_state.pt is
always complete; a run in the same out_dir resumes from the newest one.

A LoRA run (`lora.rank` > 0) saves only what it trains: the checkpoint folder is the adapter
in PEFT's layout (adapter_config.json, adapter_model.safetensors, molmo_model/lora.py) with
`train_config.json` and `training_state.pt` (whose optimizer holds the adapter's parameters
only); a resumed run takes its frozen base from `model.init_from` again.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from molmo_model.checkpoint import save_checkpoint
from molmo_model.config import MolmoConfig
from molmo_model.lora import save_adapter
from molmo_model.model import MolmoForCausalLM
from molmo_model.tokenizer import MolmoTokenizer
from training.config import TrainConfig
from training.distributed import Dist
from training.supervision import ExtraLoss

STATE_FILE = "training_state.pt"
TRAIN_CONFIG_FILE = "train_config.json"


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


def unwrap(model: nn.Module) -> MolmoForCausalLM:
    """The model inside a DDP wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model  # type: ignore[return-value]


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool):
    """(model, optimizer) state dicts on CPU, gathered whole when sharded with FSDP."""
    if not fsdp:
        return unwrap(model).state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(model, optimizer, options=opts)


def config_file(cfg: TrainConfig) -> dict[str, str]:
    """The extra file every saved model carries: how it was made."""
    return {TRAIN_CONFIG_FILE: json.dumps(cfg.to_dict(), indent=2) + "\n"}


def save_served(
    state: dict[str, torch.Tensor], config: MolmoConfig, tokenizer: MolmoTokenizer, out: Path, dtype: str,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Writes a served-layout checkpoint from a (full) state dict, atomically."""
    with torch.device("meta"):
        model = MolmoForCausalLM(config, im_patch_id=tokenizer.im_patch_id)
    model.load_state_dict({k: v.detach().cpu() for k, v in state.items()}, strict=True, assign=True)
    return save_checkpoint(model, out, tokenizer, dtype=dtype, extra_files=extra_files)


def save_lora(model: nn.Module, cfg: TrainConfig, out: Path, extra_files: dict[str, str] | None = None) -> Path:
    """The adapter folder of a LoRA run (PEFT's layout, float32) with how it was made."""
    base = str(Path(cfg.model.init_from).resolve()) if cfg.model.init_from else ""
    return save_adapter(unwrap(model), cfg.lora.adapter(), out, base_model=base,
                        extra_files={**config_file(cfg), **(extra_files or {})})  # fmt: skip


def save_training_checkpoint(
    run_dir: Path, step: int, model: nn.Module, optimizer, scheduler, tokenizer, cfg: TrainConfig,
    d: Dist, data_position: dict[str, int], losses: Sequence[ExtraLoss] = (),
) -> Path | None:
    """checkpoints/step-NNNNNN/: the served model (float32) + training_state.pt, written so
    that a folder holding training_state.pt is always complete."""
    fsdp = cfg.run.parallel == "fsdp" and d.enabled
    if cfg.lora.enabled:  # the adapter only: the frozen base is init_from's
        model_state, optim_state = None, optimizer.state_dict()
    else:
        model_state, optim_state = full_state_dicts(model, optimizer, fsdp)
    rngs = [rng_state()]
    if d.enabled:
        rngs = [None] * d.world_size
        dist.all_gather_object(rngs, rng_state())
    out = run_dir / "checkpoints" / f"step-{step:06d}"
    if d.main:
        if cfg.lora.enabled:
            save_lora(model, cfg, out)
        else:
            save_served(model_state, unwrap(model).config, tokenizer, out, "float32", config_file(cfg))
        state = {
            "step": step,
            "optimizer": optim_state,
            "scheduler": scheduler.state_dict(),
            "rng": rngs,
            "data": data_position,
            "world_size": d.world_size,
        }
        for extra in losses:  # training-only: never part of the served model
            if extra.head is not None:
                state[f"{extra.name}_head"] = {k: v.detach().cpu() for k, v in extra.head.state_dict().items()}
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


def load_training_state(
    checkpoint: Path, model: nn.Module, optimizer, scheduler, d: Dist, fsdp: bool,
    losses: Sequence[ExtraLoss] = (),
) -> int:
    """Restores optimizer, scheduler, extra heads and (on the same world size) this rank's
    RNG states from `checkpoint`; returns its step."""
    state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)
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
    for extra in losses:
        if extra.head is not None:
            key = f"{extra.name}_head"
            if key not in state:
                raise ValueError(f"{checkpoint} was saved without the {extra.name} extra; resume it without")
            extra.head.load_state_dict(state[key])
    if state.get("world_size") == d.world_size:
        set_rng_state(state["rng"][d.rank])
    elif d.main:
        print(f"resuming on {d.world_size} processes from a {state.get('world_size')}-process run: "
              "RNG streams restart")  # fmt: skip
    return int(state["step"])
