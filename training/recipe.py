"""The optimisation recipe of the Molmo paper: per-component AdamW, warmup + cosine, clipping.

Molmo trains three components at their own pace (paper, training details):

    component   parameters                                          pre-train LR / warmup   fine-tune LR
    connector   vision_backbone.{image_pooling_2d, image_projector,   2e-4 / 200 steps       5e-6
                pad_embed}
    vit         vision_backbone.image_vit                             6e-6 / 2000 steps      5e-6
    llm         transformer (embeddings, blocks, ln_f, head)          2e-5 / 2000 steps      1e-5

AdamW with betas (0.9, 0.95) and eps 1e-6; each LR warms up linearly and then decays with a
cosine to 10% of its peak at the last step; gradients are clipped per component to norm 1.

`OptimConfig` holds one run's values; `OPTIM_PRESETS` names the paper's two stages and the
fast `demo` schedule. `build_optimizer` makes one AdamW parameter group per component and a
`LambdaLR` with one schedule per group; `clip_grad_norms` clips each component separately.
`init_from_scratch` gives fresh weights that a model trained from nothing can learn from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

COMPONENTS = ("connector", "vit", "llm")


@dataclass
class OptimConfig:
    """Per-component peak learning rates and warmups, and the shared AdamW settings."""

    connector_lr: float = 2e-4
    vit_lr: float = 6e-6
    llm_lr: float = 2e-5
    connector_warmup: int = 200  # steps of linear warmup
    vit_warmup: int = 2000
    llm_warmup: int = 2000
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-6
    weight_decay: float = 0.0
    final_lr_fraction: float = 0.1  # the cosine ends at this fraction of each peak LR
    max_grad_norm: float = 1.0  # per component; 0 disables clipping

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        for c in COMPONENTS:
            if getattr(self, f"{c}_lr") < 0:
                raise ValueError(f"{c}_lr must be >= 0, got {getattr(self, f'{c}_lr')}")
            if getattr(self, f"{c}_warmup") < 0:
                raise ValueError(f"{c}_warmup must be >= 0, got {getattr(self, f'{c}_warmup')}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if not 0 <= self.final_lr_fraction <= 1:
            raise ValueError(f"final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}")
        if self.eps <= 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("eps must be > 0, weight_decay and max_grad_norm >= 0")

    def lr(self, component: str) -> float:
        return getattr(self, f"{component}_lr")

    def warmup(self, component: str) -> int:
        return getattr(self, f"{component}_warmup")


OPTIM_PRESETS: dict[str, OptimConfig] = {
    # Caption pre-training (paper): the connector learns fast, the pre-trained ViT and LLM slowly.
    "pretrain": OptimConfig(),
    # Supervised fine-tuning (paper).
    "finetune": OptimConfig(
        connector_lr=5e-6,
        vit_lr=5e-6,
        llm_lr=1e-5,
        connector_warmup=200,
        vit_warmup=200,
        llm_warmup=200,
    ),  # fmt: skip
    # LoRA (molmo train --lora): only the adapters' A and B train, from B = 0, so the first
    # steps cannot disturb the frozen model and a short warmup suffices. 2e-4 is the rate the
    # LoRA and QLoRA papers train 7B-scale decoders with (their adapters scaled by alpha/r, as
    # ours are, alpha = 2r by default); one rate for every component, because an adapter's
    # update is already small next to the weight it adds to, whether in the ViT or the LLM.
    "lora": OptimConfig(
        connector_lr=2e-4,
        vit_lr=2e-4,
        llm_lr=2e-4,
        connector_warmup=10,
        vit_warmup=10,
        llm_warmup=10,
    ),  # fmt: skip
    # The CPU demo trains every component from scratch in a few hundred steps. Its ViT learns
    # slowly: at the LLM's rate its residual stream drifts under Adam's noise-sized steps and
    # the image features grow into a large constant that hides the positions.
    "demo": OptimConfig(
        connector_lr=1e-3,
        vit_lr=2e-4,
        llm_lr=1e-3,
        connector_warmup=30,
        vit_warmup=30,
        llm_warmup=30,
    ),  # fmt: skip
}


def component_of(name: str) -> str:
    """The component a parameter of `MolmoForCausalLM` belongs to, from its (Ai2) name."""
    if ".vision_backbone.image_vit." in f".{name}":
        return "vit"
    if ".vision_backbone." in f".{name}":
        return "connector"
    return "llm"


def parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters of each component (a DDP/FSDP wrapper's prefix is ignored)."""
    groups: dict[str, list[nn.Parameter]] = {c: [] for c in COMPONENTS}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[component_of(name)].append(p)
    return groups


def lr_factor(step: int, warmup: int, total: int, final_fraction: float) -> float:
    """Multiplier of the peak LR at `step` (0-based): linear warmup over `warmup` steps,
    then a cosine from 1 down to `final_fraction` at step `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    model: nn.Module, config: OptimConfig, total_steps: int, heads: dict[str, nn.Module] | None = None
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with one group per component (empty components are left out) and its schedule.
    Each training-only head (an extra's, training/supervision.py) gets a group of its own,
    named as in `heads`, on the connector's LR and warmup."""
    groups = parameter_groups(model)
    names = [c for c in COMPONENTS if groups[c]]
    param_groups = [
        {
            "params": groups[c],
            "lr": config.lr(c),
            "component": c,
            "weight_decay": config.weight_decay,
        }
        for c in names
    ]
    for name, head in (heads or {}).items():
        param_groups.append({"params": list(head.parameters()), "lr": config.lr("connector"),
                             "component": name, "weight_decay": config.weight_decay})  # fmt: skip
        names.append("connector")  # the head's schedule
    # foreach=False keeps the update order fixed, so resumed runs match uninterrupted ones bit
    # for bit; the per-tensor loop costs nothing at the demo's sizes.
    optimizer = torch.optim.AdamW(param_groups, betas=config.betas, eps=config.eps, foreach=False)
    schedules = [
        (lambda step, c=c: lr_factor(step, config.warmup(c), total_steps, config.final_lr_fraction))
        for c in names
    ]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)
    return optimizer, scheduler


@torch.no_grad()
def clip_grad_norms(optimizer: torch.optim.Optimizer, max_norm: float) -> dict[str, float]:
    """Clips each component's gradients to `max_norm` on its own; returns the norms before
    clipping. With `max_norm` 0 nothing is clipped (the norms are still measured)."""
    norms = {}
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        limit = max_norm if max_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, limit, foreach=False)
        norms[group["component"]] = float(
            norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        )
    return norms


@torch.no_grad()
def init_from_scratch(model: nn.Module, seed: int = 0, embedding_std: float = 0.02) -> nn.Module:
    """Fan-in initialisation for a model trained from scratch (the paper starts from
    pre-trained towers, the demo from nothing).

    A uniform small std (0.02) shrinks the image features at every linear layer of the
    pooling -> SwiGLU projector chain (to ~1e-4 at a small width), so they vanish next to
    the `<im_patch>` token embedding they are added to and the vision side gets almost no
    gradient. Here every matrix gets std 1/sqrt(fan_in), residual output projections an
    extra 1/sqrt(2 * layers) (GPT-2 style), embeddings `embedding_std`, norms 1, biases and
    `pad_embed` 0; the image features then enter the LLM at unit scale. The ViT's positional
    embedding starts as a 2D sine-cosine table (`sincos_2d`): neighbouring patches start
    alike, so what is learned about "where" at one place carries over to the next, which a
    random table (one vector per patch, each learned on its own) cannot give from few images.
    """
    cfg = model.config
    n_llm, n_vit = cfg.llm.num_hidden_layers, cfg.vision.image_num_layers
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(("bias", "pad_embed")):
            p.zero_()
        elif p.ndim == 1 and ("norm" in name or "ln" in name):
            p.fill_(1.0)
        elif ".wte." in name:
            p.copy_(torch.randn(p.shape, generator=gen) * embedding_std)
        elif name.endswith("image_vit.positional_embedding"):
            p.copy_(sincos_2d(p.shape[0] - 1, p.shape[1]))
        else:
            std = p.shape[-1] ** -0.5  # fan-in (class/positional embeddings: their width)
            if ".blocks." in name and name.endswith(("attn_out.weight", "ff_out.weight")):
                std /= math.sqrt(2 * n_llm)
            elif ".resblocks." in name and name.endswith(("wo.weight", "w2.weight")):
                std /= math.sqrt(2 * n_vit)
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def sincos_2d(n_patches: int, width: int, temperature: float = 10_000.0) -> torch.Tensor:
    """[1 + n_patches, width]: a zero row for the class token, then for the patch at (row,
    col) of the sqrt(n_patches)-sided grid sin/cos of row and col at width/4 frequencies each."""
    side = math.isqrt(n_patches)
    if side * side != n_patches or width % 4:
        raise ValueError(f"sincos_2d needs a square patch grid and width % 4 == 0, got {n_patches}, {width}")
    quarter = width // 4
    freqs = temperature ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # [W/4]
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    r = rows.flatten()[:, None].double() * freqs  # [N, W/4]
    c = cols.flatten()[:, None].double() * freqs
    table = torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1)  # [N, W]
    return torch.cat([torch.zeros(1, width, dtype=torch.float64), table]).float()
