"""The import graph of `immich_aio`: no cycle, and every import points down the layers below.

Data flows one way (HTTP → protocol adapters → the request path → runtime → pipeline → registry → models), and
the imports follow it: a module never imports one in its own layer or above (a package's modules may share a
layer only where they never import each other). Function-level imports count too: they are how a cycle hides.
`python tests/test_layering.py` prints the graph by layer.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "immich_aio"

# Top to bottom. A module may import only modules of a lower layer.
LAYERS: list[list[str]] = [
    ["__main__"],
    ["cli"],
    ["serving", "download.cli"],
    ["app"],
    ["adapters.immich", "adapters.mt_photos", "adapters.status", "adapters.fork_ocr"],
    ["adapters.mt_ocr", "edge", "reporting"],
    ["runtime"],
    ["autofetch", "healthcheck"],
    ["download.clip", "download.faces", "download.ocr"],
    ["download.clip_split", "download.clip_export", "download.install", "download.hf", "download.validate"],
    ["download.fetch"],
    ["pipeline", "admission"],
    ["registry"],
    ["names.clip", "names.faces", "names.ocr"],
    ["models.clip_immich"],
    ["models.clip", "models.faces", "models.ocr"],
    ["models.base"],
    ["sessions"],
    ["payload", "batching", "config"],
    ["metrics", "imaging", "memory", "access_log", "http_form", "protocol", "names.fetchable", "names.catalog"],
    ["ort_cache", "openvino"],
    ["ort_pack"],
    ["mapped_load", "graph_pool"],
    ["graph_prelu", "graph_split"],
    ["store", "models.outputs", "jobs", "graph_fold", "onnx_walk"],
    ["errors", "tasks", "priority"],
    ["__init__", "adapters", "download", "models", "names"],
]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" and len(rel.parts) > 1 else rel.parts
    return ".".join(parts)


def imports(path: Path, known: set[str]) -> set[str]:
    """Every `immich_aio` module this file imports, wherever the import statement stands."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name == "immich_aio" or not name.startswith("immich_aio."):
                continue
            target = name.removeprefix("immich_aio.")
            if target in known:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    # a package's __init__ is named by the package; the top one is "__init__"
    return {name: imports(path, known) - {name} for name, path in files.items()}


def rank() -> dict[str, int]:
    return {module: i for i, layer in enumerate(LAYERS) for module in layer}


def test_every_module_has_a_layer() -> None:
    modules = set(graph())
    layered = set(rank())
    assert modules - layered == set(), "modules missing from LAYERS"
    assert layered - modules == set(), "LAYERS names modules that do not exist"


def test_imports_only_point_down() -> None:
    ranks = rank()
    upward = sorted(
        f"{module} (layer {ranks[module]}) imports {target} (layer {ranks[target]})"
        for module, targets in graph().items()
        for target in targets
        if module in ranks and target in ranks and ranks[target] <= ranks[module]
    )
    assert upward == []


def test_no_import_cycle() -> None:
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return [*path, node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state:
            assert visit(start, []) is None


def test_the_checker_sees_a_function_level_import(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from immich_aio.app import create_app\n    import immich_aio.edge\n")
    assert imports(source, {"app", "edge"}) == {"app", "edge"}


if __name__ == "__main__":
    edges = graph()
    for i, layer in enumerate(LAYERS):
        for module in layer:
            below = ", ".join(sorted(edges.get(module, ()), key=lambda m: (rank()[m], m)))
            sys.stdout.write(f"{i:2d} {module:28s} -> {below or '-'}\n")
