"""Configuration of a training run: one dataclass per component, nested into `TrainConfig`.

A run is described by a preset (`RUN_PRESETS`: `demo`, `demo-gpu`, `smoke`, `pretrain-7b`, `finetune-7b`)
and/or a TOML or JSON file whose tables mirror the dataclasses::

    preset = "demo"            # optional: start from a preset, then override
    [model]
    preset = "demo"            # a model shape from molmo_model.config.PRESETS
    [data]
    batch_size = 8
    [data.scene]               # fields of training.data.synthetic.SceneConfig
    max_count = 10
    [optim]
    preset = "demo"            # training.recipe.OPTIM_PRESETS, then field overrides
    llm_lr = 1e-3
    [run]
    steps = 500
    [extras.dense]             # the demo's extra supervision (training/extras/), off by default
    weight = 1.0
    [lora]                     # train a LoRA adapter on a frozen init_from checkpoint (off: rank 0)
    rank = 16

Unknown keys are errors naming the key. `TrainConfig.to_dict()` is what a run saves beside
its checkpoints (`train_config.json`), so every model records how it was made. The extras'
keys had a place in `run` and `data` before they got their own section (`run.dense_loss`,
`data.recovery_prob`, ...: `ALIASES`); those names still load, so older configs and
`--set run.dense_loss=0` keep working.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from molmo_model.config import LLMConfig, MolmoConfig, VisionConfig, get_preset
from molmo_model.lora import DECODER_TARGETS, TARGETS, LoRAConfig
from training.data.synthetic import ClockConfig, SceneConfig, SyntheticConfig
from training.extras import ExtrasConfig
from training.extras.dense import DenseConfig
from training.extras.grounding import GroundingConfig
from training.extras.recovery import RecoveryConfig
from training.recipe import OPTIM_PRESETS, OptimConfig


class RunError(ValueError):
    """What was asked of a run cannot be done (its config, its folder, its data): the message
    says why for the user; `molmo train` prints it and exits 2."""


@dataclass
class ModelSpec:
    """Which model to train: a preset shape with fresh weights, or an existing checkpoint."""

    preset: str = "demo"  # a molmo_model.config.PRESETS name
    init_from: str | None = None  # a checkpoint folder (served layout) to start from instead
    init: str = "scaled"  # fresh weights: "scaled" (fan-in, recipe.init_from_scratch) or "uniform" (std init_std)
    init_std: float = 0.02  # std of every fresh weight matrix when init = "uniform"
    max_crops: int | None = None  # overrides the preset's preprocess.max_crops
    # Overrides the preset's preprocess.image_mask_rule ("ai2" or "per_crop"; image_masks.py).
    # Presets use Ai2's rule, `demo` the per-crop rule the committed demo model was trained with.
    image_mask_rule: str | None = None
    llm: dict[str, Any] = field(default_factory=dict)  # LLMConfig field overrides
    vision: dict[str, Any] = field(default_factory=dict)  # VisionConfig field overrides

    def __post_init__(self) -> None:
        if self.init not in ("scaled", "uniform"):
            raise ValueError(f"model.init must be 'scaled' or 'uniform', got {self.init!r}")

    def build(self, embedding_size: int) -> MolmoConfig:
        """The model config, its vocabulary sized to the tokenizer's `embedding_size`."""
        if self.init_from is not None:
            cfg = MolmoConfig.load(self.init_from)
        else:
            cfg = get_preset(self.preset)
            llm = {**dataclasses.asdict(cfg.llm), "vocab_size": embedding_size,
                   "embedding_size": embedding_size, **self.llm}  # fmt: skip
            cfg.llm = _build(LLMConfig, llm, "model.llm")
            cfg.vision = _build(VisionConfig, {**dataclasses.asdict(cfg.vision), **self.vision}, "model.vision")
        if self.max_crops is not None:
            cfg.preprocess = dataclasses.replace(cfg.preprocess, max_crops=self.max_crops)
        if self.image_mask_rule is not None:
            cfg.preprocess = dataclasses.replace(cfg.preprocess, image_mask_rule=self.image_mask_rule)
        return cfg


@dataclass
class DataConfig:
    """Where examples come from and how they become batches."""

    source: str = "synthetic"  # "synthetic" (generated from seeds) or "jsonl"
    path: str | None = None  # the JSONL file when source = "jsonl"
    val_path: str | None = None  # held-out JSONL scored by the quick evaluations (`run.eval_every`)
    split: str = "train"  # synthetic split
    size: int = 10**9  # synthetic examples available (a fresh image per index)
    scene: dict[str, Any] = field(default_factory=dict)  # SceneConfig overrides
    clock: dict[str, Any] = field(default_factory=dict)  # ClockConfig overrides
    clock_fraction: float = 0.2
    pack: bool = True  # multi-annotation packing; False = one annotation per sequence
    max_len: int = 1536  # tokens per packed sequence (image prefix included)
    batch_size: int = 4  # images per device per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_batch_tokens: int = 0  # split a micro-batch into length-sorted forwards of at most
    # this many padded tokens each (less padding, same gradient); 0 = one forward
    shuffle: bool = True  # reshuffle finite datasets every epoch
    num_workers: int = 0  # DataLoader worker processes that render and pack batches

    def __post_init__(self) -> None:
        if self.source not in ("synthetic", "jsonl"):
            raise ValueError(f"data.source must be 'synthetic' or 'jsonl', got {self.source!r}")
        if self.source == "jsonl" and not self.path:
            raise ValueError("data.path is required when data.source = 'jsonl'")
        if self.batch_size < 1 or self.grad_accum < 1 or self.size < 1:
            raise ValueError("data.batch_size, data.grad_accum and data.size must be >= 1")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        self.synthetic()  # validates the generator overrides

    def synthetic(self) -> SyntheticConfig:
        return SyntheticConfig(
            scene=_build(SceneConfig, self.scene, "data.scene"),
            clock=_build(ClockConfig, self.clock, "data.clock"),
            clock_fraction=self.clock_fraction,
        )


@dataclass
class RunConfig:
    """Length, logging, checkpoints and hardware of a run."""

    out_dir: str = "runs/train"  # log.jsonl, loss.png, checkpoints/, model/
    steps: int = 1000  # optimizer steps; the LR schedule spans them
    seed: int = 0
    log_every: int = 10
    save_every: int = 0  # steps between resumable checkpoints; 0 = only at the end
    keep_checkpoints: int = 2  # most recent resumable checkpoints kept
    eval_every: int = 0  # steps between quick held-out evaluations (reference generator); 0 = off
    eval_examples: int = 24  # held-out images per quick evaluation
    resume: bool = True  # continue from the newest checkpoint in out_dir/checkpoints
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda"
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32", "bf16"
    parallel: str = "ddp"  # "ddp" or "fsdp" when launched with torchrun (WORLD_SIZE > 1)
    threads: int = 0  # torch.set_num_threads; 0 leaves torch's default
    grad_checkpointing: bool = False  # recompute each decoder block in backward (same gradients, less memory)
    response_dropout: float = 0.0  # residual dropout on response tokens (paper's pre-training)
    save_dtype: str = "float32"  # dtype of the final served model (checkpoints stay float32)
    export_dir: str | None = None  # also write the final served model here ("" = nowhere else)
    time_limit_s: float = 0.0  # stop (checkpoint + final model) once the loop has run this long; 0 = no limit
    schedule_by_time: bool = False  # with time_limit_s: after the warmup (by steps) the LR schedule
    # runs at least as fast as wall time (the time left mapped onto the steps left), so the decay
    # ends at the limit on a machine of any speed
    progress: bool = True  # tqdm bar on rank 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"run.steps must be >= 1, got {self.steps}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"run.device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"run.precision must be 'auto', 'fp32' or 'bf16', got {self.precision!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"run.parallel must be 'ddp' or 'fsdp', got {self.parallel!r}")
        if not 0.0 <= self.response_dropout < 1.0:
            raise ValueError(f"run.response_dropout must be in [0, 1), got {self.response_dropout}")
        if self.save_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"run.save_dtype must be float32, bfloat16 or float16, got {self.save_dtype!r}")
        if self.log_every < 1 or self.save_every < 0 or self.eval_every < 0 or self.keep_checkpoints < 1:
            raise ValueError("run.log_every and run.keep_checkpoints must be >= 1, save_every/eval_every >= 0")
        if self.time_limit_s < 0:
            raise ValueError(f"run.time_limit_s must be >= 0, got {self.time_limit_s}")
        self.export_dir = self.export_dir or None  # TOML has no null: "" means no export


@dataclass
class LoRATrainConfig:
    """`[lora]`: train a LoRA adapter (molmo_model/lora.py) instead of the whole model. The
    `init_from` checkpoint stays frozen (optionally held in bf16); only the adapter's A and B
    matrices train, and the run's output is a PEFT adapter folder (`run_dir/adapter`)."""

    rank: int = 0  # r; 0 = off (every parameter trains)
    alpha: float | None = None  # the update is scaled by alpha / rank; None = 2 x rank
    dropout: float = 0.05  # on each adapter's input, in training only
    targets: tuple[str, ...] = DECODER_TARGETS  # from molmo_model.lora.TARGETS
    base_dtype: str = "float32"  # the frozen base's weights: "float32" or "bfloat16" (needs bf16 autocast)

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):  # --set lora.targets=att_proj,ff_out
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        self.targets = tuple(self.targets)
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 0:
            raise ValueError(f"lora.rank must be an integer >= 1 (0 = off), got {self.rank!r}")
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float)
                                       or self.alpha <= 0):  # fmt: skip
            raise ValueError(f"lora.alpha must be a number > 0, got {self.alpha!r}")
        if not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"lora.targets: unknown {unknown or 'none given'}; choose from {','.join(TARGETS)}")
        if self.base_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"lora.base_dtype must be 'float32' or 'bfloat16', got {self.base_dtype!r}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def adapter(self) -> LoRAConfig:
        """The adapter's shape (alpha resolved)."""
        alpha = float(2 * self.rank if self.alpha is None else self.alpha)
        return LoRAConfig(rank=self.rank, alpha=alpha, dropout=float(self.dropout), targets=self.targets)


# Where the extras' keys lived before they got their own section: (section, key) -> extras table, key.
ALIASES: dict[tuple[str, str], tuple[str, str]] = {
    ("run", "dense_loss"): ("dense", "weight"),
    ("run", "dense_object_attributes"): ("dense", "object_attributes"),
    ("run", "grounding_loss"): ("grounding", "weight"),
    ("run", "grounding_layers"): ("grounding", "layers"),
    ("run", "grounding_lead"): ("grounding", "lead"),
    ("run", "grounding_start"): ("grounding", "start"),
    ("data", "recovery_prob"): ("recovery", "prob"),
}


# Fields a resumed run may change: how it is watched and stored, and how long it may run.
# Anything else changes what the checkpoint's step means, and `--resume` refuses it.
RESUMABLE_CHANGES = frozenset({
    "run.resume", "run.progress", "run.time_limit_s", "run.log_every", "run.save_every",
    "run.keep_checkpoints", "run.eval_every", "run.eval_examples", "run.threads", "run.export_dir",
    "run.grad_checkpointing",
    "data.num_workers",
})  # fmt: skip


@dataclass
class TrainConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    extras: ExtrasConfig = field(default_factory=ExtrasConfig)  # the demo's extra supervision
    lora: LoRATrainConfig = field(default_factory=LoRATrainConfig)  # adapter training; off by default

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self) -> None:
        """Rules across sections, checked before a run starts (a ValueError names the field)."""
        if self.model.init_from is None and self.model.preset == "molmo-7b-d":
            raise ValueError("model.init_from is required for the molmo-7b-d shape (--init-from CKPT): "
                             "random 7B weights with the demo's 512-token tokenizer train nothing useful")
        if self.data.source == "jsonl":
            on = self._extras_on()
            if on:
                raise ValueError(f"{on[0].rsplit('.', 1)[0]} is the synthetic demo's supervision and does not run "
                                 f"on JSONL data (data.source = 'jsonl'); turn it off: --set {on[0]}=0")
        elif self.data.val_path:
            raise ValueError("data.val_path is for JSONL data; synthetic runs evaluate on their own val split")
        if self.lora.enabled:
            self._check_lora()

    def _check_lora(self) -> None:
        if self.model.init_from is None:
            raise ValueError("lora.rank: a LoRA adapts trained weights, and fresh random ones have nothing to "
                             "adapt: give the checkpoint to start from with --init-from CKPT "
                             "(or train the whole model without --lora)")  # fmt: skip
        if self.run.parallel == "fsdp":
            raise ValueError("lora.rank: LoRA training does not run with run.parallel = 'fsdp' (the frozen base is "
                             "not sharded); use run.parallel = 'ddp' (the default), with lora.base_dtype = "
                             "'bfloat16' to halve the base's memory")  # fmt: skip
        if self.lora.base_dtype == "bfloat16" and self.run.precision == "fp32":
            raise ValueError("lora.base_dtype = 'bfloat16' runs under bf16 autocast: set run.precision to 'bf16' "
                             "(or 'auto' on CUDA), or keep lora.base_dtype = 'float32'")  # fmt: skip
        on = self._extras_on()
        if on:
            raise ValueError(f"{on[0].rsplit('.', 1)[0]} is the demo's supervision of a whole model and does not "
                             f"run with a LoRA (lora.rank > 0); turn it off (--set {on[0]}=0) or train without --lora")  # fmt: skip

    def _extras_on(self) -> list[str]:
        """The switches (`extras.NAME.KEY`) of the demo's extras that are on."""
        switches = {"extras.dense.weight": self.extras.dense.weight,
                    "extras.grounding.weight": self.extras.grounding.weight,
                    "extras.recovery.prob": self.extras.recovery.prob}  # fmt: skip
        return [name for name, value in switches.items() if value > 0]

    def changes_from(self, saved: dict[str, Any]) -> list[str]:
        """The fields (`section.key`) where this config differs from a saved `to_dict()`,
        except those a resumed run may change (`RESUMABLE_CHANGES`)."""
        now, defaults = self.to_dict(), TrainConfig().to_dict()
        changed = []
        for section, values in now.items():
            old = saved.get(section, defaults[section])  # a section added since: its defaults
            for key, value in values.items():
                name = f"{section}.{key}"
                if name not in RESUMABLE_CHANGES and json.loads(json.dumps(value)) != old.get(key):
                    changed.append(name)
        return changed

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """A config from nested dicts; `preset` keys (top level, optim) apply first."""
        d = _resolve_aliases(d)
        base = run_preset(d.pop("preset")).to_dict() if "preset" in d else cls().to_dict()
        unknown = sorted(set(d) - set(base))
        if unknown:
            raise ValueError(f"unknown config key {unknown[0]!r}; allowed: preset, {', '.join(base)}")
        merged: dict[str, Any] = {}
        for section, defaults in base.items():
            over = dict(d.get(section) or {})
            if section == "optim" and "preset" in over:
                name = over.pop("preset")
                if name not in OPTIM_PRESETS:
                    raise ValueError(f"optim.preset {name!r} is unknown; choose one of {sorted(OPTIM_PRESETS)}")
                defaults = dataclasses.asdict(OPTIM_PRESETS[name])
            merged[section] = _merge(defaults, over, section)
        return cls(
            model=_build(ModelSpec, merged["model"], "model"),
            data=_build(DataConfig, merged["data"], "data"),
            optim=_build(OptimConfig, merged["optim"], "optim"),
            run=_build(RunConfig, merged["run"], "run"),
            extras=ExtrasConfig(**{f.name: _build(type(getattr(ExtrasConfig(), f.name)), merged["extras"][f.name],
                                                  f"extras.{f.name}") for f in dataclasses.fields(ExtrasConfig)}),
            lora=_build(LoRATrainConfig, merged["lora"], "lora"),
        )  # fmt: skip

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """A config from a .toml or .json file."""
        p = Path(path)
        if p.suffix == ".toml":
            d = tomllib.loads(p.read_text())
        elif p.suffix == ".json":
            d = json.loads(p.read_text())
        else:
            raise ValueError(f"config: {p} must be a .toml or .json file")
        return cls.from_dict(d)


def _resolve_aliases(d: dict[str, Any]) -> dict[str, Any]:
    """A copy of `d` with the extras' old keys (`ALIASES`) moved to their `extras` tables."""
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    extras = {k: dict(v) if isinstance(v, dict) else v for k, v in (d.get("extras") or {}).items()}
    for (section, key), (table, name) in ALIASES.items():
        if not isinstance(d.get(section), dict) or key not in d[section]:
            continue
        value = d[section].pop(key)
        target = extras.setdefault(table, {})
        if not isinstance(target, dict):
            raise ValueError(f"extras.{table} must be a table")
        if name in target and target[name] != value:
            raise ValueError(f"{section}.{key} and extras.{table}.{name} name the same setting; give one")
        target[name] = value
    if extras:
        d["extras"] = extras
    return d


def _merge(defaults: dict[str, Any], over: dict[str, Any], where: str) -> dict[str, Any]:
    unknown = sorted(set(over) - set(defaults))
    if unknown:
        raise ValueError(f"unknown config key {where}.{unknown[0]}; allowed: {', '.join(defaults)}")
    out = dict(defaults)
    for k, v in over.items():
        # Generator/model override tables merge key by key; everything else replaces.
        out[k] = {**defaults[k], **v} if isinstance(defaults[k], dict) and isinstance(v, dict) else v
    return out


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown config key {where}.{unknown[0]}; allowed: {', '.join(sorted(names))}")
    return cls(**values)


# ---------------------------------------------------------------- run presets

# The demo's scenes: few clear kinds and colours on plain backgrounds, objects large enough
# to hit, 0..10 instances of the target, a few distractors, no captions or clocks.
DEMO_SCENE = {
    "width_range": (336, 336),
    "height_range": (336, 336),
    "kinds": ("circle", "square", "triangle"),
    "colours": ("red", "green", "blue"),
    "backgrounds": ("solid",),
    "max_count": 10,
    "max_distractors": 4,
    "size_range": (0.12, 0.17),
    "fill": 0.45,
    "max_questions": 5,
    "absent_prob": 0.2,
    "caption_prob": 0.0,
}


# The robust demo's scenes: DEMO_SCENE's kinds, colours and counts drawn with everything that
# should not matter varied: image sizes and aspect ratios (224-800 px a side), object sizes,
# shades, outlines, rotations, soft edges, background styles and tints, JPEG artefacts.
ROBUST_SCENE = {
    **DEMO_SCENE,
    "width_range": (224, 800),
    "height_range": (224, 800),
    "backgrounds": ("solid", "gradient", "noise", "texture", "clutter"),
    "max_distractors": 6,
    "size_range": (0.08, 0.18),
    "shade": 1.0,
    "outline_prob": 0.5,
    "rotation": 180.0,
    "supersample": 4,
    "background_tint": 20.0,
    "jpeg_prob": 0.3,
}


def _demo() -> TrainConfig:
    """The demo model from nothing on the 2-core CPU, inside 45 minutes: the extras
    (training/extras/) stand in for the pre-trained vision tower the paper starts from. How
    these values were chosen and what they gave: models/molmo-demo/README.md ("History of the presets")."""
    return TrainConfig(
        model=ModelSpec(preset="demo"),
        data=DataConfig(scene=dict(DEMO_SCENE), clock_fraction=0.0, batch_size=8, max_len=1024,
                        max_batch_tokens=2400),
        optim=dataclasses.replace(OPTIM_PRESETS["demo"]),
        # More steps than fit the time limit: the limit ends the run on a machine of any speed,
        # and schedule_by_time still decays the LR schedule fully by then.
        run=RunConfig(out_dir="runs/demo", steps=3600, log_every=10, save_every=100, eval_every=600,
                      eval_examples=8, threads=2, export_dir="models/molmo-demo", time_limit_s=2640,
                      schedule_by_time=True),
        extras=ExtrasConfig(dense=DenseConfig(weight=1.0, object_attributes=1.0),
                            grounding=GroundingConfig(weight=1.0, layers=(-2, -1), lead=True),
                            recovery=RecoveryConfig(prob=0.5)),
    )  # fmt: skip


def _demo_robust() -> TrainConfig:
    """The demo model fine-tuned on ROBUST_SCENE on the 2-core CPU, so that it points at shapes
    however they are drawn (issue 18): the demo's extras and schedule, half its learning
    rates, an hour's limit. A candidate, not the default: its final model stays in
    runs/demo-robust/model (what it reached: experiments/README.md, "Robust scenes")."""
    cfg = _demo()
    cfg.model = ModelSpec(preset="demo", init_from="models/molmo-demo")
    cfg.data = dataclasses.replace(cfg.data, scene=dict(ROBUST_SCENE))
    half = {k: getattr(cfg.optim, k) / 2 for k in ("connector_lr", "vit_lr", "llm_lr")}
    cfg.optim = dataclasses.replace(cfg.optim, **half)
    cfg.run = dataclasses.replace(cfg.run, out_dir="runs/demo-robust", steps=20_000,
                                  time_limit_s=3600, eval_every=0, export_dir=None)  # fmt: skip
    return cfg


def _demo_gpu() -> TrainConfig:
    """The demo's recipe on one lent GPU (an H100's 15 minutes): the same model, data, extras
    and learning rates, for 450 s of training, twice the demo's batch in one forward (no
    length-sorted split), rendered by 8 loader processes; fp32, as the CPU demo trains; no
    quick evaluations. Why: models/molmo-demo/README.md."""
    cfg = _demo()
    cfg.data = dataclasses.replace(cfg.data, batch_size=16, max_batch_tokens=0, num_workers=8)
    cfg.run = dataclasses.replace(cfg.run, out_dir="runs/demo-gpu", steps=20_000, device="cuda",
                                  precision="fp32", time_limit_s=450, save_every=1000, eval_every=0,
                                  log_every=50)  # fmt: skip
    return cfg


def _smoke() -> TrainConfig:
    """A few steps of the `tiny` model: checks a set-up end to end in a minute."""
    return TrainConfig(
        model=ModelSpec(preset="tiny", max_crops=1),
        data=DataConfig(scene=dict(DEMO_SCENE), clock_fraction=0.2, batch_size=2, max_len=768),
        optim=dataclasses.replace(OPTIM_PRESETS["demo"], connector_warmup=2, vit_warmup=2, llm_warmup=2),
        run=RunConfig(out_dir="runs/smoke", steps=4, log_every=1, save_every=2),
    )  # fmt: skip


def _paper(stage: str) -> TrainConfig:
    """The paper's recipe at Molmo-7B-D's shape (needs GPUs and a real checkpoint)."""
    return TrainConfig(
        model=ModelSpec(preset="molmo-7b-d"),
        data=DataConfig(max_len=2304, batch_size=1),
        optim=dataclasses.replace(OPTIM_PRESETS[stage]),
        run=RunConfig(out_dir=f"runs/{stage}-7b", steps=22_000 if stage == "pretrain" else 23_000,
                      parallel="fsdp", save_every=1000,
                      response_dropout=0.1 if stage == "pretrain" else 0.0),
    )  # fmt: skip


RUN_PRESETS = {
    "demo": _demo,
    "demo-gpu": _demo_gpu,
    "demo-robust": _demo_robust,
    "smoke": _smoke,
    "pretrain-7b": lambda: _paper("pretrain"),
    "finetune-7b": lambda: _paper("finetune"),
}


def run_preset(name: str) -> TrainConfig:
    if name not in RUN_PRESETS:
        raise ValueError(f"preset {name!r} is unknown; choose one of {sorted(RUN_PRESETS)}")
    return RUN_PRESETS[name]()
