"""FSDP across two CPU processes (gloo) and bf16 autocast training, on the `tiny` model.

- FSDP2 (`run.parallel = "fsdp"`, every LLM and ViT block sharded) on two processes of one
  image each takes the steps of one process on both images: the same losses and, after two
  steps, the same exported weights within float tolerance; the export is a complete served
  checkpoint (strict load).
- bf16 autocast (`run.precision = "bf16"`) on the CPU: the loss differs from fp32 by bf16's
  rounding only, falls over a few steps, and the export (float32 master weights) loads.

    pytest tests/test_training_fsdp_bf16.py -q
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import free_port

from molmo_model.checkpoint import load_checkpoint
from training.config import DEMO_SCENE, DataConfig, ModelSpec, RunConfig, TrainConfig
from training.recipe import OptimConfig
from training.train import train


def _config(out: Path, steps: int, batch_size: int, **run) -> TrainConfig:
    return TrainConfig(
        model=ModelSpec(preset="tiny", max_crops=1),
        data=DataConfig(scene=dict(DEMO_SCENE), clock_fraction=0.0, batch_size=batch_size, max_len=700, size=2),
        optim=OptimConfig(connector_lr=2e-3, vit_lr=2e-3, llm_lr=2e-3, connector_warmup=1, vit_warmup=1,
                          llm_warmup=1),
        run=RunConfig(out_dir=str(out), steps=steps, log_every=1, progress=False, device="cpu", **run),
    )  # fmt: skip


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())}


def _fsdp_worker(rank: int, world: int, port: int, out: str) -> None:
    """One torchrun-like rank: its place in the group from the environment, as torchrun sets it."""
    env = {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": rank, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    os.environ.update({k: str(v) for k, v in env.items()})
    torch.set_num_threads(1)
    train(_config(Path(out), steps=2, batch_size=1, parallel="fsdp"))


def test_fsdp_on_two_gloo_processes_equals_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    train(_config(one, steps=2, batch_size=2))
    torch.multiprocessing.spawn(_fsdp_worker, args=(2, free_port(), str(two)), nprocs=2, join=True)
    a, b = _losses(one), _losses(two)
    for step in (1, 2):
        assert b[step] == pytest.approx(a[step], rel=1e-5)
    wa = load_checkpoint(one / "model", with_tokenizer=False)[0].state_dict()
    wb = load_checkpoint(two / "model", with_tokenizer=False)[0].state_dict()  # strict: every tensor
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5)
    assert (two / "checkpoints" / "step-000002" / "training_state.pt").exists()


def test_bf16_autocast_training_lowers_the_loss_and_exports_float32(tmp_path):
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    train(_config(fp32, steps=1, batch_size=2, precision="fp32"))
    final = train(_config(bf16, steps=8, batch_size=2, precision="bf16"))
    first = _losses(fp32)[1]
    losses = _losses(bf16)
    assert losses[1] != first and losses[1] == pytest.approx(first, rel=2e-2)  # bf16 rounding, not fp32
    assert losses[8] < 0.7 * losses[1], losses
    model, config, _ = load_checkpoint(final)
    assert config.torch_dtype == "float32" and all(p.dtype == torch.float32 for p in model.parameters())
