"""The layers of ``pipeline/`` (docs/ARCHITECTURE.md): each module imports only its own layer
and the layers below it, read from the import statements (top-level and inside functions)."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "pipeline"
# lowest first; a module may import its own layer and any layer before it
LAYERS = [
    ("base", {"pipeline.errors", "pipeline.console"}),
    ("io", {"pipeline.io"}),
    ("options", {"pipeline.config", "pipeline.ray_setup"}),
    ("models", {"pipeline.models"}),
    ("restoration", {"pipeline.restoration"}),
    ("train", {"pipeline.train"}),
    ("stages", {"pipeline.stages"}),
    ("entry", {"pipeline.cli"}),
]
FORBIDDEN = {("train", "restoration")}  # training never imports inference


def _layer(module: str) -> int:
    for i, (_name, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} belongs to no layer: add it to docs/ARCHITECTURE.md and this test")


def _imports(path: pathlib.Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            for alias in node.names:  # `from pipeline.io import storage` imports pipeline.io.storage
                out.add(node.module if node.module != "pipeline" else f"pipeline.{alias.name}")
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("pipeline")}
    return out


def test_every_module_imports_only_its_layer_and_below():
    modules = sorted(p for p in ROOT.rglob("*.py") if p.name != "__init__.py")
    assert len(modules) > 25
    wrong = []
    for path in modules:
        name = "pipeline." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
        here = _layer(name)
        for target in _imports(path):
            there = _layer(target)
            if there > here or (LAYERS[here][0], LAYERS[there][0]) in FORBIDDEN:
                wrong.append(f"{name} ({LAYERS[here][0]}) imports {target} ({LAYERS[there][0]})")
    assert not wrong, "\n".join(wrong)
