"""The layers of ``pipeline/`` (docs/ARCHITECTURE.md): each module imports only its own layer
and the layers below it, read from the import statements (top-level and inside functions); and
the layer table in docs/ARCHITECTURE.md lists exactly these layers and the modules on disk."""

from __future__ import annotations

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1] / "pipeline"
DOC = ROOT.parent / "docs" / "ARCHITECTURE.md"
TABLE = "the layer table in docs/ARCHITECTURE.md (section 'Layers')"
# lowest first; a module may import its own layer and any layer before it
LAYERS = [
    ("base", {"pipeline.errors", "pipeline.redaction", "pipeline.console"}),
    ("io", {"pipeline.io"}),
    ("options", {"pipeline.config", "pipeline.ray_setup"}),
    ("models", {"pipeline.models"}),
    ("restoration", {"pipeline.restoration"}),
    ("train", {"pipeline.train"}),
    ("stages", {"pipeline.stages"}),
    ("entry", {"pipeline.cli"}),
]
FORBIDDEN = {("train", "restoration")}  # training never imports inference


def _layer_of(module: str) -> int | None:
    for i, (_name, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def _layer(module: str) -> int:
    i = _layer_of(module)
    if i is None:
        raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in this test and to {TABLE}")
    return i


def _modules() -> list[pathlib.Path]:
    return sorted(p for p in ROOT.rglob("*.py") if p.name != "__init__.py")


def _module_name(path: pathlib.Path) -> str:
    return "pipeline." + ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _folder(layer: int) -> str:
    """The folder the table's module names are relative to: ``io/`` for a layer that is one
    package, ``""`` (``pipeline/`` itself) for a layer of single modules."""
    prefixes = LAYERS[layer][1]
    if len(prefixes) == 1:
        (prefix,) = prefixes
        folder = ROOT.parent.joinpath(*prefix.split("."))
        if folder.is_dir():
            return folder.relative_to(ROOT).as_posix() + "/"
    return ""


def _table() -> list[tuple[str, list[str]]]:
    """The rows of the layer table, top to bottom: (layer, the module names in backticks)."""
    text = DOC.read_text()
    assert "\n## Layers\n" in text, f"{DOC} has no '## Layers' section"
    section = text.split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or cells[0] == "layer" or set(cells[0]) <= set("-: "):
            continue  # the header and the separator
        rows.append((cells[0].strip("`").rstrip("/"), re.findall(r"`([^`]+\.py)`", cells[1])))
    return rows


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
    modules = _modules()
    assert len(modules) > 25
    wrong = []
    for path in modules:
        name = _module_name(path)
        here = _layer(name)
        for target in _imports(path):
            there = _layer(target)
            if there > here or (LAYERS[here][0], LAYERS[there][0]) in FORBIDDEN:
                wrong.append(f"{name} ({LAYERS[here][0]}) imports {target} ({LAYERS[there][0]})")
    assert not wrong, "\n".join(wrong)


def test_architecture_table_lists_the_layers_and_every_module():
    rows = _table()
    names = [name for name, _ in LAYERS]
    problems = []
    # the layers top to bottom, each one run of consecutive rows, in the order of LAYERS
    runs = [layer for i, (layer, _) in enumerate(rows) if i == 0 or rows[i - 1][0] != layer]
    if runs != names:
        problems.append(
            f"{TABLE}: the layer column reads {runs} top to bottom (one run of rows per layer); "
            f"LAYERS in tests/test_layers.py is {names}"
        )
    on_disk: dict[str, str] = {}  # path under pipeline/ -> layer
    for path in _modules():
        rel = path.relative_to(ROOT).as_posix()
        i = _layer_of(_module_name(path))
        if i is None:
            problems.append(
                f"pipeline/{rel} belongs to no layer: add it to LAYERS in tests/test_layers.py and to {TABLE}"
            )
        else:
            on_disk[rel] = names[i]
    listed: dict[str, str] = {}  # path under pipeline/ -> the layer of the row that lists it
    for layer, modules in rows:
        if layer not in names:
            problems.append(f"{TABLE}: a row of layer '{layer}', which is not in LAYERS ({names}): rename or remove it")
            continue
        for module in modules:
            rel = _folder(names.index(layer)) + module
            if rel in listed:
                problems.append(f"{TABLE}: `{module}` is listed twice (rows of '{listed[rel]}' and '{layer}')")
            listed[rel] = layer
            if rel not in on_disk:
                problems.append(
                    f"{TABLE}: a row of layer '{layer}' lists `{module}`, but there is no pipeline/{rel}: "
                    "remove it or fix its name"
                )
            elif on_disk[rel] != layer:
                there = on_disk[rel]
                problems.append(
                    f"{TABLE}: `{module}` is in a row of layer '{layer}', but LAYERS puts pipeline/{rel} in "
                    f"'{there}': move it to a row of layer '{there}'"
                )
    for rel, layer in sorted(on_disk.items()):
        if rel not in listed:
            module = rel.removeprefix(_folder(names.index(layer)))
            problems.append(f"{TABLE}: pipeline/{rel} is missing: add `{module}` to a row of layer '{layer}'")
    assert not problems, "\n".join(problems)
