"""The package's plan, enforced: imports point down the layers only, and the math stays torch-only.

    commands → driver, reporting → runtime → tasks → data, models, losses → math → config

Every import of a `dist_tempnet` module is checked, including imports inside functions (a lazy
import is still a dependency). Within one layer, modules may import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dist_tempnet"

# (layer rank, what the modules of that layer are); a higher rank may import a lower or equal one.
LAYERS = {
    "config": 0,
    "metric_names": 0,  # the logged metric names (torch-free)
    "comm": 1,
    "tempnet": 1,
    "dro_state": 1,
    "metrics": 1,
    "tau_stats": 1,
    "data": 2,
    "models": 2,
    "losses": 2,
    "tasks": 3,
    "runtime": 4,
    "driver": 5,
    "reporting": 5,
    "commands": 6,
    "train": 6,  # `python -m dist_tempnet.train`: a thin entry into commands/worker.py
    "__init__": 6,  # lazy re-exports of the public names
}
# Third-party packages the lower layers must never import (a bare GPU box has none of them).
HEAVY = {"ray", "mlflow", "deepspeed"}
TORCH_ONLY = {"comm", "tempnet", "dro_state", "metrics", "tau_stats", "models", "losses", "config"}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _component(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            if node.module == "dist_tempnet":
                # `from dist_tempnet import comm`: the names are modules of the package.
                found += [(node.lineno, f"dist_tempnet.{alias.name}") for alias in node.names]
    return found


def _target_component(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "dist_tempnet" or len(parts) < 2:
        return None
    return parts[1]


def test_every_module_belongs_to_a_layer():
    unknown = sorted({_component(p) for p in _modules()} - set(LAYERS))
    assert not unknown, f"modules outside the layer plan (add them to LAYERS in this test): {unknown}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path):
    own = _component(path)
    violations = []
    for line, module in _imports(path):
        target = _target_component(module)
        if target is None or target not in LAYERS:
            continue
        if LAYERS[target] > LAYERS[own]:
            violations.append(
                f"line {line}: {own} (layer {LAYERS[own]}) imports {module} (layer {LAYERS[target]})"
            )
    assert not violations, "\n".join(violations)


@pytest.mark.parametrize(
    "path",
    [p for p in _modules() if _component(p) in TORCH_ONLY | {"data", "tasks"}],
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_math_data_and_tasks_never_import_ray_or_mlflow(path: Path):
    own = _component(path)
    banned = HEAVY if own in TORCH_ONLY else {"ray", "mlflow"}
    bad = [f"line {line}: {m}" for line, m in _imports(path) if m.split(".")[0] in banned]
    assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(banned)}: {bad}"


def test_the_checker_catches_an_upward_import(tmp_path):
    """The rule is not vacuous: a math module importing the runtime is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from dist_tempnet.runtime.trainer import Trainer\n")
    targets = [_target_component(m) for _, m in _imports(bad)]
    assert targets == ["runtime"] and LAYERS["runtime"] > LAYERS["tempnet"]
