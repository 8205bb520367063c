"""Checkpoints in Ai2's layout: safetensors weights named as in Molmo's releases, an HF
`config.json` (with our vision/geometry extras) and the tokenizer files, in one folder.

Both model families load here: `config.json`'s model_type / architectures say which
(`molmo`: MolmoForCausalLM, `molmo2`: Molmo2ForConditionalGeneration, molmo_model/molmo2/).
Each family's modules carry Ai2's names, so the weight-name table is the model's own
`state_dict()`, checked the same way for both.

Loading is strict: a missing, unexpected or mis-shaped tensor is an error naming it.
Saving is atomic: files are written to a temporary sibling folder that is renamed at the end.

    molmo init --preset tiny --out /tmp/tiny      # random weights, real geometry
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from molmo_model.config import MolmoConfig, get_preset
from molmo_model.model import MolmoForCausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHTS_INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    pass


def weight_files(path: str | Path) -> list[Path]:
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {path}")
    return files


def iter_weights(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (Ai2 name, tensor) for every tensor in a checkpoint folder (sharded or not).
    With a shard index, a tensor the index places in another file (or lists but no file has)
    is an error naming it."""
    index_file = Path(path) / WEIGHTS_INDEX
    listed = json.loads(index_file.read_text())["weight_map"] if index_file.exists() else None
    seen: set[str] = set()
    for f in weight_files(path):
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                if listed is not None and listed.get(name, f.name) != f.name:
                    raise CheckpointError(
                        f"{path}: {name} is in {f.name} but {WEIGHTS_INDEX} says {listed[name]}"
                    )
                seen.add(name)
                yield name, sf.get_tensor(name)
    if listed is not None and set(listed) - seen:
        raise CheckpointError(
            f"{path}: {WEIGHTS_INDEX} lists tensors no shard holds: " + ", ".join(sorted(set(listed) - seen))
        )


MOLMO, MOLMO2 = "molmo", "molmo2"
_FAMILIES = {  # model_type -> (family, architecture)
    "molmo": (MOLMO, "MolmoForCausalLM"),
    "molmo2": (MOLMO2, "Molmo2ForConditionalGeneration"),
}


def model_family(hf: dict) -> str:
    """Which Molmo a config.json describes, from model_type (or, without one, architectures).
    An official Molmo config without model_type is Molmo."""
    model_type = hf.get("model_type")
    if model_type is None:
        archs = hf.get("architectures") or ["MolmoForCausalLM"]
        by_arch = {arch: fam for fam, arch in _FAMILIES.values()}
        for arch in archs:
            if arch in by_arch:
                return by_arch[arch]
        raise CheckpointError(f"config.json architectures {archs} is no Molmo model we know")
    if model_type not in _FAMILIES:
        raise CheckpointError(
            f"config.json model_type {model_type!r} is not supported (supported: {sorted(_FAMILIES)})"
        )
    return _FAMILIES[model_type][0]


def load_config(path: str | Path):
    """MolmoConfig or Molmo2Config, by the family config.json names."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    hf = json.loads(p.read_text())
    if model_family(hf) == MOLMO2:
        from molmo_model.molmo2.config import Molmo2Config

        try:
            return Molmo2Config.from_hf_dict(hf)
        except ValueError as e:
            raise CheckpointError(f"{p}: {e}") from None
    return MolmoConfig.from_hf_dict(hf)


def check_state_dict(
    expected: dict[str, torch.Size],
    found: dict[str, torch.Size],
    where: str,
    wrong_dtypes: list[str] | None = None,
) -> None:
    """Raises CheckpointError naming every missing, unexpected and mis-shaped tensor (and the
    `wrong_dtypes` a caller found, e.g. quantize.dtype_problems)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    bad = sorted(
        f"{k}: checkpoint {tuple(found[k])} vs model {tuple(expected[k])}"
        for k in set(expected) & set(found)
        if tuple(expected[k]) != tuple(found[k])
    )
    problems = []
    if missing:
        problems.append("missing tensors: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected tensors: " + ", ".join(unexpected))
    if bad:
        problems.append("mis-shaped tensors: " + "; ".join(bad))
    if wrong_dtypes:
        problems.append("wrong dtypes: " + "; ".join(wrong_dtypes))
    if problems:
        raise CheckpointError(f"checkpoint {where} does not match its config: " + " | ".join(problems))


def _tokenizer_ids(tokenizer) -> int | None:
    return None if tokenizer is None else tokenizer.im_patch_id


def write_weights(
    state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int = 4 << 30
) -> None:
    """Writes `state` as model.safetensors, or as shards with an index past max_shard_bytes."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
             "weight_map": {}}  # fmt: skip
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        index["weight_map"].update({k: name for k in shard})
    (folder / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2))


def save_checkpoint(
    model: torch.nn.Module,
    out_dir: str | Path,
    tokenizer=None,
    dtype: str | None = None,
    max_shard_bytes: int = 4 << 30,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Writes config.json, model*.safetensors and the tokenizer files to out_dir, atomically.
    Either family: the model's `config.to_hf_dict()` and `state_dict()` are Ai2's layout."""
    out = Path(out_dir)
    cfg = model.config
    dtype = dtype or cfg.torch_dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    state = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in model.state_dict().items()}
    with atomic_folder(out) as tmp:
        write_weights(state, tmp, max_shard_bytes)
        hf = cfg.to_hf_dict()
        hf["torch_dtype"] = dtype
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out


@contextlib.contextmanager
def atomic_folder(out: str | Path) -> Iterator[Path]:
    """A temporary sibling of `out` to write into; when the block ends it takes `out`'s place
    (an existing `out` is replaced only then), with ordinary permissions. On an error it is
    removed and `out` is left as it was. Every folder this project writes goes through here."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        # mkdtemp makes a private (0700) folder: give it ordinary permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def quant_spec(path: str | Path):
    """The checkpoint's int4 layout (molmo_model.quantize.QuantSpec) when its config.json has
    a `quantization_config`, else None. Raises CheckpointError for a layout we cannot load."""
    hf = json.loads((Path(path) / "config.json").read_text())
    if hf.get("quantization_config") is None:
        return None
    from molmo_model.quantize import QuantSpec

    try:
        return QuantSpec.from_hf(hf["quantization_config"])
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_checkpoint(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
    with_tokenizer: bool = True,
):
    """Returns (model, config, tokenizer or None) for either family (model_family). Strict
    about tensor names and shapes. An int4 Molmo checkpoint (`molmo quantize`) loads
    dequantized: the weights vLLM's kernels use. A Molmo 2 checkpoint's tokenizer is a
    `Molmo2Tokenizer` when the folder has a tokenizer.json (None otherwise)."""
    from molmo_model.tokenizer import MolmoTokenizer

    path = Path(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path} has no config.json")
    config = load_config(path)
    spec = quant_spec(path)
    if isinstance(config, MolmoConfig):
        tokenizer = MolmoTokenizer.from_dir(path) if with_tokenizer else None
        with torch.device("meta"):
            model = MolmoForCausalLM(config, im_patch_id=_tokenizer_ids(tokenizer))
    else:  # Molmo 2; its tokenizer comes with its processor, not here yet
        from molmo_model.molmo2.model import Molmo2ForConditionalGeneration

        if spec is not None:
            raise CheckpointError(f"{path}: quantized Molmo 2 checkpoints are not supported")
        tokenizer = None
        if with_tokenizer and (path / "tokenizer.json").is_file():
            from molmo_model.tokenizer import Molmo2Tokenizer

            tokenizer = Molmo2Tokenizer.from_dir(path)
        with torch.device("meta"):
            model = Molmo2ForConditionalGeneration(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    weights = dict(iter_weights(path))
    if spec is None:
        check_state_dict(expected, {k: v.shape for k, v in weights.items()}, str(path))
    else:  # int4 (molmo_model/quantize.py): checked as stored, then dequantized
        from molmo_model import quantize

        expected, kinds = quantize.quantized_shapes(expected, spec)
        wrong = quantize.dtype_problems(kinds, {k: v.dtype for k, v in weights.items()})
        wrong += quantize.g_idx_problems(weights, spec)
        check_state_dict(expected, {k: v.shape for k, v in weights.items()}, str(path), wrong)
        weights = quantize.dequantize_state_dict(weights)
    if dtype is not None:
        weights = {k: v.to(dtype) for k, v in weights.items()}
    model.load_state_dict(weights, strict=True, assign=True)
    return model.to(device), config, tokenizer


def init_checkpoint(
    preset: str,
    out_dir: str | Path,
    seed: int = 0,
    std: float = 0.02,
    dtype: str = "float32",
    config: MolmoConfig | None = None,
) -> Path:
    """Writes a random-weight checkpoint with our tokenizer (vocab sized to it). A Molmo 2
    preset (`molmo2-tiny`, ...) gets our small BPE in Molmo 2's layout (build_molmo2_tokenizer)."""
    from molmo_model.tokenizer import build_tokenizer

    if preset.startswith("molmo2"):
        return _init_molmo2_checkpoint(preset, out_dir, seed, std, dtype)
    tok = build_tokenizer()
    if config is None:
        config = get_preset(preset)
        config.llm.vocab_size = config.llm.embedding_size = tok.embedding_size
    elif config.llm.embedding_size != tok.embedding_size:
        raise ValueError(
            f"config embedding_size {config.llm.embedding_size} != tokenizer's {tok.embedding_size}"
        )
    config.torch_dtype = dtype
    torch.manual_seed(seed)
    model = MolmoForCausalLM(config, im_patch_id=tok.im_patch_id).init_weights(std=std, seed=seed)
    return save_checkpoint(model, out_dir, tok, dtype=dtype)


def _init_molmo2_checkpoint(preset: str, out_dir: str | Path, seed: int, std: float, dtype: str) -> Path:
    from molmo_model.molmo2.config import molmo2_o_tiny, molmo2_tiny
    from molmo_model.molmo2.model import Molmo2ForConditionalGeneration
    from molmo_model.tokenizer import build_molmo2_tokenizer

    tok = build_molmo2_tokenizer()
    tiny = {"molmo2-tiny": molmo2_tiny, "molmo2-o-tiny": molmo2_o_tiny}
    if preset in tiny:
        config = tiny[preset](vocab_size=tok.vocab_size)
    else:  # release shapes keep Qwen3's / OLMo 3's vocabulary: our small BPE does not fit them
        raise ValueError(f"molmo init: preset {preset!r} needs the release's tokenizer; only "
                         f"{' and '.join(tiny)} are written with ours")  # fmt: skip
    config.torch_dtype = dtype
    torch.manual_seed(seed)
    model = Molmo2ForConditionalGeneration(config).init_weights(std=std, seed=seed)
    return save_checkpoint(model, out_dir, tok, dtype=dtype)
