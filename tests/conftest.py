"""Fixtures the test modules share, the engine's environment and the `vllm` marker's guard.

Plain helpers (images, the OpenAI error assertion, servers, engines) are in helpers.py.
Session fixtures here are shared across modules: no test may change them in place.

    pytest -m "not vllm and not server"     # the fast loop: no engine, no server process
"""

from __future__ import annotations

import os
from pathlib import Path

import helpers
import pytest

from molmo_model.checkpoint import init_checkpoint, save_checkpoint
from molmo_model.config import tiny
from molmo_model.model import MolmoForCausalLM
from molmo_model.tokenizer import MolmoTokenizer, build_tokenizer


def pytest_configure(config: pytest.Config) -> None:
    # In-process engines and server subprocesses alike read it; a value set by the caller wins.
    for name, value in helpers.ENGINE_ENV.items():
        os.environ.setdefault(name, value)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # Before the item's fixtures (module-scoped ones included) are set up.
    helpers.ENGINE_ALLOWED = item.get_closest_marker("vllm") is not None


@pytest.fixture(scope="session")
def tok() -> MolmoTokenizer:
    """Our tokenizer at its default size (512 ids, the tiny and demo models')."""
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight checkpoint of the `tiny` preset (Molmo's real image geometry)."""
    return init_checkpoint("tiny", tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(scope="session")
def decisive_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, tok: MolmoTokenizer
) -> tuple[Path, MolmoForCausalLM, MolmoTokenizer]:
    """A tiny checkpoint whose greedy choices have wide margins (helpers.decisive_model),
    with its model in memory."""
    model = helpers.decisive_model(tiny(vocab_size=tok.vocab_size), tok)
    path = save_checkpoint(model, tmp_path_factory.mktemp("decisive") / "tiny", tok)
    return path, model, tok


@pytest.fixture(scope="session")
def molmo2_release_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint Ai2's Molmo 2 code made tests/golden/ai2_molmo2.json on, rebuilt from its
    recipe (tests/molmo2_release.py): Molmo2-4B's layout, full SigLIP 2 tower, tiny decoder,
    bf16 on disk (~900 MB, ~10 s)."""
    import molmo2_release

    return molmo2_release.build_release_checkpoint(tmp_path_factory.mktemp("molmo2") / "release")


@pytest.fixture(scope="session")
def molmo2_olmo3_release_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The OLMo 3 checkpoint Ai2's code made tests/golden/ai2_molmo2_olmo3.json on, rebuilt
    from its recipe (tests/molmo2_olmo3_release.py): tiny vision tower, 4-layer OLMo 3
    decoder, OLMo 3's vocabulary size (~30 MB, ~2 s)."""
    import molmo2_olmo3_release

    return molmo2_olmo3_release.build_release_checkpoint(
        tmp_path_factory.mktemp("molmo2_olmo3") / "release"
    )
