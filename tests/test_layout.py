"""The architecture as tests: which package may import which, and molmo_model without vLLM.

    molmo_cli      the `molmo` command; dispatches to the packages below it
    server         HTTP on vLLM's engine       -> molmo_vllm, molmo_model
    training       trainer, data, evaluation   -> molmo_model, kernels (molmo_vllm for eval)
    molmo_vllm     the vLLM plugin, the prompt -> molmo_model
    molmo_model    Molmo in plain PyTorch      -> kernels
    kernels        Triton + PyTorch references -> nothing of ours

Every import counts, the ones inside functions included (read from the source's syntax
tree), so a lazy import cannot hide an upward dependency. Within training, only the
evaluation (cli.py, evaluate*.py) may import the independent renderer, independent_scenes.py.

Run: pytest tests/test_layout.py -q
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"molmo_cli", "server", "training", "molmo_vllm", "molmo_model", "kernels", "clients", "molmo_bench"}
# package -> our packages it may import
ALLOWED = {
    "kernels": set(),
    "molmo_model": {"kernels"},
    "molmo_vllm": {"molmo_model", "kernels"},
    "training": {"molmo_model", "kernels", "molmo_vllm"},
    "server": {"molmo_vllm", "molmo_model", "kernels"},
    "clients": set(),
    "molmo_bench": {"molmo_model"},  # a client of any endpoint: HTTP only, no server/ or vLLM
    "molmo_cli": {"molmo_model", "server", "training", "molmo_bench", "clients"},
}


def imported_packages(path: Path) -> set[str]:
    """Top-level names of everything `path` imports, at any depth, plus importlib targets."""
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", None) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            names.add(str(node.args[0].value).split(".")[0])
    return names


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_downward(package: str) -> None:
    wrong = {
        str(path.relative_to(ROOT)): sorted(bad)
        for path in modules(package)
        if (bad := (imported_packages(path) & OURS) - ALLOWED[package] - {package})
    }
    assert not wrong, f"{package} imports packages above it: {wrong}"


def imported_modules(path: Path) -> set[str]:
    """Full dotted names of everything `path` imports, at any depth (`from a.b import c`
    counts as `a.b` and `a.b.c`)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_only_evaluation_draws_independent_scenes() -> None:
    """training/independent_scenes.py is the held-out renderer: a training module that used
    it would train on what the evaluation means to keep unseen."""
    allowed = {"training/cli.py", "training/independent_scenes.py"}
    users = [
        rel
        for p in modules("training")
        if (rel := str(p.relative_to(ROOT))) not in allowed
        and not p.name.startswith("evaluate")
        and "training.independent_scenes" in imported_modules(p)
    ]
    assert not users, f"training modules that import the evaluation-only renderer: {users}"


def test_molmo_model_knows_nothing_of_vllm() -> None:
    users = [
        str(p.relative_to(ROOT))
        for p in modules("molmo_model")
        if {"vllm", "fastapi", "uvicorn"} & imported_packages(p)
    ]
    assert not users, f"molmo_model modules that import vLLM or the server stack: {users}"


def test_every_molmo_model_module_imports_without_vllm() -> None:
    """Each module is imported in a fresh interpreter where `import vllm` fails."""
    names = ["molmo_model." + p.stem for p in modules("molmo_model") if p.stem != "__init__"]
    names += ["molmo_model", "molmo_vllm", "molmo_vllm.prompt", "molmo_cli"]
    code = (
        "import sys; sys.modules['vllm'] = None\n"  # None in sys.modules: ImportError on import
        "import importlib\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "assert 'vllm' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "molmo_model.model" in names and "molmo_model.preprocessing" in names
