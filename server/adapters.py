"""LoRA adapters served beside the base model: names, checks, and vLLM's LoRA requests.

    molmo serve --model BASE --lora-modules pets=runs/pets/adapter tools=runs/tools/adapter \
                --max-loras 2 --max-lora-rank 16

A request's `model` picks what answers it: the base's name (or none) the base, an adapter's
name that adapter (vLLM applies it per request, so requests for different adapters batch
together). Adapters are PEFT folders as `molmo train --lora` writes them
(molmo_model/lora.py); each is checked against the base's config before vLLM sees it, so a
bad one is refused with a message naming the problem (rank over --max-lora-rank, modules the
base lacks or that vLLM cannot adapt, tensors of another base's shapes, missing files) and
the others keep serving. With --allow-runtime-lora, `POST /v1/load_lora_adapter` and
`/v1/unload_lora_adapter` (vLLM's names and bodies) add and remove adapters at run time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from molmo_model.config import MolmoConfig
from molmo_model.lora import AdapterError, read_adapter
from server.errors import APIError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")


@dataclass
class ServedAdapter:
    name: str
    path: str
    int_id: int  # vLLM's id for the adapter (unique over the server's life)
    rank: int

    def request(self) -> Any:
        from vllm.lora.request import LoRARequest

        return LoRARequest(self.name, self.int_id, self.path)


def parse_lora_modules(items: list[str] | None) -> tuple[tuple[str, str], ...]:
    """`NAME=DIR` strings -> ((name, dir), ...); ValueError naming a malformed one."""
    out = []
    for item in items or ():
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"lora_modules: {item!r} is not NAME=DIR")
        out.append((name.strip(), path.strip()))
    return tuple(out)


class Adapters:
    """The adapters a server serves, by name."""

    def __init__(self, base_name: str, base_path: str, base: MolmoConfig, max_rank: int) -> None:
        self.base_name, self.base_path, self.base, self.max_rank = base_name, base_path, base, max_rank
        self.by_name: dict[str, ServedAdapter] = {}
        self._next_id = 1

    def check(self, name: str, path: str) -> ServedAdapter:
        """The adapter `name` at `path`, checked (AdapterError/ValueError naming the problem),
        not yet registered."""
        if not _NAME.fullmatch(name):
            raise ValueError(f"adapter name {name!r}: use letters, digits and . _ : / - (at most 128)")
        if name in (self.base_name, self.base_path):
            raise ValueError(f"adapter name {name!r} is the base model's name")
        if name in self.by_name:
            raise ValueError(f"an adapter named {name!r} is already loaded")
        adapter = read_adapter(path, self.base, max_rank=self.max_rank, servable_only=True)
        return ServedAdapter(name, str(Path(path).resolve()), self._next_id, adapter.config.rank)

    def register(self, adapter: ServedAdapter) -> ServedAdapter:
        if adapter.name in self.by_name:  # loaded by a concurrent request meanwhile
            raise ValueError(f"an adapter named {adapter.name!r} is already loaded")
        self.by_name[adapter.name] = adapter
        self._next_id = max(self._next_id, adapter.int_id + 1)
        return adapter

    def add(self, name: str, path: str) -> ServedAdapter:
        """check + register in one (start-up)."""
        return self.register(self.check(name, path))

    def reserve_id(self) -> int:
        """An id no other adapter has or will get (taken before a slow check)."""
        self._next_id += 1
        return self._next_id - 1

    def remove(self, name: str) -> ServedAdapter:
        if name not in self.by_name:
            raise APIError(404, f"no adapter named {name!r} is loaded", param="lora_name",
                           code="model_not_found")  # fmt: skip
        return self.by_name.pop(name)

    def resolve(self, model: str | None) -> ServedAdapter | None:
        """The adapter a request's `model` names; None for the base; 404 for anything else."""
        if model is None or model in (self.base_name, self.base_path):
            return None
        adapter = self.by_name.get(model)
        if adapter is None:
            served = ", ".join(repr(n) for n in [self.base_name, *self.by_name])
            raise APIError(404, f"model {model!r} is not served here; this server serves {served}",
                           param="model", code="model_not_found")  # fmt: skip
        return adapter


def adapter_error(e: Exception) -> APIError:
    """A refused adapter as the API answers it (400, the problem in the message)."""
    return APIError(400, str(e), param="lora_path" if isinstance(e, AdapterError) else "lora_name",
                    code="invalid_adapter")  # fmt: skip
