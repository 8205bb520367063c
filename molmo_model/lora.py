"""LoRA adapters for Molmo, written and read in PEFT's format.

A LoRA adds to a frozen linear layer `y = W x + b` a low-rank update
`(alpha / r) * B (A dropout(x))` with A [r, in] and B [out, r] (B starts at zero, so a fresh
adapter changes nothing). Only A and B train; a trained adapter is a few MB beside the base.

Targets are named as Ai2's checkpoints name the modules:

    name        modules (paths in `MolmoForCausalLM`, = Ai2's weight names less `.weight`)
    att_proj    model.transformer.blocks.{i}.att_proj          fused QKV (with bias)
    attn_out    model.transformer.blocks.{i}.attn_out
    ff_proj     model.transformer.blocks.{i}.ff_proj           fused (x, gate) halves
    ff_out      model.transformer.blocks.{i}.ff_out            (never the LM head transformer.ff_out)
    connector   model.vision_backbone.image_pooling_2d.{wq,wk,wv,wo}, image_projector.{w1,w2,w3}
    vit         model.vision_backbone.image_vit.transformer.resblocks.{i}.{attention.{wq,wk,wv,wo},
                feed_forward.{w1,w2}}

The decoder's four (`DECODER_TARGETS`) are the default and the ones vLLM serves as adapters
(molmo_vllm/model.py declares them); connector and ViT adapters train and merge
(`merge_adapter`, `molmo export --merge-lora`) but are served merged.

On disk an adapter is PEFT's folder: `adapter_config.json` (peft_type LORA, r, lora_alpha,
lora_dropout, target_modules as a regex over the module paths above, base_model_name_or_path)
and `adapter_model.safetensors` with `base_model.model.{module path}.lora_{A,B}.weight`, the
names PEFT gives an adapter of Ai2's HF model, which vLLM's LoRA loader maps onto our vLLM
model (its `hf_to_vllm_mapper` strips the leading `model.`) with no conversion step.
`read_adapter` is strict, as checkpoint loading is: a missing file, an unsupported PEFT
feature, a module the base does not have or a tensor of the wrong shape raises AdapterError
naming it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from molmo_model.config import MolmoConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

DECODER_TARGETS = ("att_proj", "attn_out", "ff_proj", "ff_out")
TOWER_TARGETS = ("connector", "vit")
TARGETS = DECODER_TARGETS + TOWER_TARGETS

# Target name -> regex over module paths of MolmoForCausalLM (fully matched, as PEFT does).
_TARGET_PATTERNS = {
    **{t: rf"model\.transformer\.blocks\.\d+\.{t}" for t in DECODER_TARGETS},
    "connector": r"model\.vision_backbone\.(image_pooling_2d\.(wq|wk|wv|wo)|image_projector\.(w1|w2|w3))",
    "vit": r"model\.vision_backbone\.image_vit\.transformer\.resblocks\.\d+\."
    r"(attention\.(wq|wk|wv|wo)|feed_forward\.(w1|w2))",
}


class AdapterError(ValueError):
    """An adapter folder that cannot be used with this base: the message names the problem."""


@dataclass
class LoRAConfig:
    """One adapter's shape: rank, scale, dropout and which modules it adapts."""

    rank: int = 8  # r
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input, in training only
    targets: tuple[str, ...] = DECODER_TARGETS  # names from TARGETS

    def __post_init__(self) -> None:
        self.targets = tuple(dict.fromkeys(self.targets))
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora rank must be an integer >= 1, got {self.rank!r}")
        if self.alpha <= 0:
            raise ValueError(f"lora alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"lora targets: unknown {unknown or 'none given'}; choose from {','.join(TARGETS)}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def pattern(self) -> str:
        """PEFT's `target_modules` as one regex (PEFT full-matches a string against each path)."""
        return "|".join(f"({_TARGET_PATTERNS[t]})" for t in self.targets)

    @property
    def servable(self) -> bool:
        """Whether vLLM applies every target as an adapter (the decoder's only)."""
        return all(t in DECODER_TARGETS for t in self.targets)


def target_of(module_path: str) -> str | None:
    """The target name a module path belongs to (None: not a LoRA target)."""
    for name, pattern in _TARGET_PATTERNS.items():
        if re.fullmatch(pattern, module_path):
            return name
    return None


class LoRALinear(nn.Linear):
    """nn.Linear plus a LoRA update. Its state dict keeps the base's `weight`/`bias` names and
    adds `lora_A.weight` [r, in] and `lora_B.weight` [out, r]."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same (frozen) parameters
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device)
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if device.type != "meta":
            self.reset_lora()

    @torch.no_grad()
    def reset_lora(self, generator: torch.Generator | None = None) -> None:
        """PEFT's initialisation: A Kaiming-uniform (a = sqrt(5)), B zero."""
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) on [r, in]
        a = torch.empty_like(self.lora_A.weight, device="cpu").uniform_(-bound, bound, generator=generator)
        self.lora_A.weight.copy_(a)
        self.lora_B.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if not torch.is_autocast_enabled(x.device.type):
            # A bfloat16 base with float32 adapters. Under autocast the adapter's matmuls run in
            # the autocast dtype anyway, and a float32 copy would only make dropout keep a
            # float32 mask of the input for backward.
            x = x.to(self.lora_A.weight.dtype)
        update = self.lora_B(self.lora_A(self.lora_dropout(x)))
        return out + (update * self.scaling).to(out.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + scaling * B A (in the base weight's dtype)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)  # fmt: skip
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling  # [out, in]
        lin.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin


def target_modules(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Paths of the nn.Linear modules of `model` that `config` adapts, in module order."""
    wanted = set(config.targets)
    names = [name for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and target_of(name) in wanted]  # fmt: skip
    if not names:
        raise ValueError(f"no module of the model matches lora targets {list(config.targets)}")
    return names


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def add_lora(model: nn.Module, config: LoRAConfig, seed: int = 0) -> list[str]:
    """Wraps every target of `model` in a LoRALinear (A drawn from `seed`) and freezes all
    other parameters. Returns the adapted module paths."""
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    names = target_modules(model, config)
    for name in names:
        lora = LoRALinear(model.get_submodule(name), config.rank, config.alpha, config.dropout)
        lora.reset_lora(gen)
        _set_module(model, name, lora)
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's names (`base_model.model.{path}.lora_A.weight`)."""
    out = {}
    for name, m in lora_modules(model).items():
        name = name.removeprefix("module.")  # a DDP wrapper's prefix
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return out


@torch.no_grad()
def load_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copies PEFT-named tensors into the model's LoRALinear modules (all of them, exactly)."""
    mods = lora_modules(model)
    expected = {}
    for name, m in mods.items():
        expected[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight
        expected[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight
    _check_names_and_shapes({k: v.shape for k, v in expected.items()},
                            {k: v.shape for k, v in tensors.items()}, "adapter")  # fmt: skip
    for k, p in expected.items():
        p.copy_(tensors[k].to(p.dtype))


def merge_lora(model: nn.Module) -> nn.Module:
    """Replaces every LoRALinear by its merged nn.Linear, in place; returns the model."""
    for name, m in list(lora_modules(model).items()):
        _set_module(model, name, m.merged())
    return model


def adapter_config_dict(config: LoRAConfig, base_model: str = "") -> dict:
    """adapter_config.json in PEFT's fields."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": config.pattern,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def save_adapter(model: nn.Module, config: LoRAConfig, out_dir: str | Path, base_model: str = "",
                 extra_files: dict[str, str] | None = None) -> Path:  # fmt: skip
    """Writes the adapter folder atomically (molmo_model.checkpoint.atomic_folder)."""
    from molmo_model.checkpoint import atomic_folder

    out = Path(out_dir)
    tensors = {k: v.to("cpu", torch.float32).contiguous() for k, v in adapter_state_dict(model).items()}
    if not tensors:
        raise ValueError("the model has no LoRA modules to save")
    with atomic_folder(out) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config_dict(config, base_model), indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out


# ---------------------------------------------------------------------------- reading


@dataclass
class Adapter:
    """A checked adapter folder: its config, its tensors (PEFT names) and its module paths."""

    path: Path
    config: LoRAConfig
    tensors: dict[str, torch.Tensor] = field(repr=False)
    modules: list[str]  # adapted module paths, as in MolmoForCausalLM
    base_model: str = ""

    @property
    def servable(self) -> bool:
        return self.config.servable


# PEFT features an adapter here cannot use (vLLM refuses them too), with the value that is fine.
_UNSUPPORTED = {"use_dora": False, "bias": "none", "use_rslora": False, "fan_in_fan_out": False,
                "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {},
                "alpha_pattern": {}}  # fmt: skip


def _check_names_and_shapes(expected: dict[str, torch.Size], found: dict[str, torch.Size], where: str) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    bad = sorted(f"{k}: {tuple(found[k])}, the base needs {tuple(expected[k])}"
                 for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))  # fmt: skip
    problems = []
    if missing:
        problems.append("missing tensors: " + ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else ""))
    if unexpected:
        problems.append("unexpected tensors: " + ", ".join(unexpected[:6]) + (" ..." if len(unexpected) > 6 else ""))
    if bad:
        problems.append("tensors of another shape: " + "; ".join(bad[:6]) + (" ..." if len(bad) > 6 else ""))
    if problems:
        raise AdapterError(f"{where} does not fit the base model: " + " | ".join(problems))


def _module_shapes(config: MolmoConfig) -> dict[str, tuple[int, int]]:
    """Module path -> (out, in) of every nn.Linear of the reference model with `config`."""
    from molmo_model.model import MolmoForCausalLM

    with torch.device("meta"):
        model = MolmoForCausalLM(config)
    return {name: (m.out_features, m.in_features) for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def read_adapter(path: str | Path, base: MolmoConfig, max_rank: int | None = None,
                 servable_only: bool = False) -> Adapter:  # fmt: skip
    """Reads and checks an adapter folder against the base model's config. Raises AdapterError
    naming the problem: a missing folder or file, an unreadable config or weights file, a PEFT
    feature we do not support, a rank above `max_rank`, modules the base does not have or
    that cannot be adapted (with `servable_only`: anything but the decoder's four), tensors
    whose shapes belong to another base."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter {path} is not a folder")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (path / name).is_file():
            raise AdapterError(f"adapter {path} has no {name}")
    try:
        raw = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"adapter {path}: {ADAPTER_CONFIG} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"adapter {path}: {ADAPTER_CONFIG} must hold a JSON object")
    if raw.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter {path}: peft_type {raw.get('peft_type')!r} is not LORA")
    for key, fine in _UNSUPPORTED.items():
        if raw.get(key, fine) not in (fine, None) and not (fine == {} and not raw.get(key)):
            raise AdapterError(f"adapter {path}: {key}={raw[key]!r} is not supported (only {fine!r})")
    rank, alpha = raw.get("r"), raw.get("lora_alpha", raw.get("r"))
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterError(f"adapter {path}: r must be a positive integer, got {rank!r}")
    if max_rank is not None and rank > max_rank:
        raise AdapterError(f"adapter {path}: rank {rank} is over the server's maximum {max_rank} "
                           "(--max-lora-rank)")  # fmt: skip
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or alpha <= 0:
        raise AdapterError(f"adapter {path}: lora_alpha must be a positive number, got {alpha!r}")
    try:
        with safe_open(str(path / ADAPTER_WEIGHTS), framework="pt") as sf:
            tensors = {k: sf.get_tensor(k) for k in sf.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"adapter {path}: {ADAPTER_WEIGHTS} cannot be read ({e})") from None
    if not tensors:
        raise AdapterError(f"adapter {path}: {ADAPTER_WEIGHTS} holds no tensors")

    shapes = _module_shapes(base)
    modules: dict[str, set[str]] = {}
    unknown, untargetable = [], []
    for key in tensors:
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)\.weight", key)
        if m is None:
            unknown.append(key)
            continue
        module = m.group(1)
        if module not in shapes:
            unknown.append(module)
        elif target_of(module) is None:
            untargetable.append(module)
        else:
            modules.setdefault(module, set()).add(m.group(2))
    if unknown:
        raise AdapterError(f"adapter {path}: unknown target modules (not in this base model): "
                           + ", ".join(sorted(set(unknown))[:6]))  # fmt: skip
    if untargetable:
        raise AdapterError(f"adapter {path}: modules that cannot take a LoRA here: {', '.join(sorted(untargetable)[:6])} "
                           f"(targets: {', '.join(TARGETS)})")  # fmt: skip
    targets = tuple(dict.fromkeys(t for t in TARGETS for mod in modules if target_of(mod) == t))
    if servable_only:
        tower = [t for t in targets if t not in DECODER_TARGETS]
        if tower:
            raise AdapterError(f"adapter {path} adapts {', '.join(tower)}: vLLM serves adapters of the decoder "
                               f"({', '.join(DECODER_TARGETS)}) only; merge it into a full checkpoint with "
                               "`molmo export --merge-lora` and serve that")  # fmt: skip
    expected = {}
    for module in modules:
        out_f, in_f = shapes[module]
        expected[f"{PEFT_PREFIX}{module}.lora_A.weight"] = torch.Size((rank, in_f))
        expected[f"{PEFT_PREFIX}{module}.lora_B.weight"] = torch.Size((out_f, rank))
    found = {k if k.startswith(PEFT_PREFIX) else PEFT_PREFIX + k: v.shape for k, v in tensors.items()}
    _check_names_and_shapes(expected, found, f"adapter {path}")
    tensors = {k if k.startswith(PEFT_PREFIX) else PEFT_PREFIX + k: v for k, v in tensors.items()}
    try:
        config = LoRAConfig(rank=rank, alpha=float(alpha), dropout=float(raw.get("lora_dropout") or 0.0),
                            targets=targets)  # fmt: skip
    except ValueError as e:
        raise AdapterError(f"adapter {path}: {e}") from None
    return Adapter(path, config, tensors, sorted(modules), str(raw.get("base_model_name_or_path") or ""))


def apply_adapter(model: nn.Module, adapter: Adapter) -> nn.Module:
    """Wraps the adapter's modules of `model` in LoRALinear (no dropout) holding its weights."""
    for name in adapter.modules:
        lora = LoRALinear(model.get_submodule(name), adapter.config.rank, adapter.config.alpha)
        _set_module(model, name, lora)
    load_adapter_state(model, adapter.tensors)
    return model


def merge_adapter(model: nn.Module, adapter: Adapter) -> nn.Module:
    """The base model with the adapter merged into its weights (in place)."""
    return merge_lora(apply_adapter(model, adapter))
