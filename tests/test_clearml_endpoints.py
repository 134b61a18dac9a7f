"""The local ClearML server's layout: the endpoint list it prints is the one its doc gives, and its
sub-package has no import cycle and imports nothing of the ML code."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import stepwise.clearml_server

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "clearml-server.md"
PACKAGE = Path(stepwise.clearml_server.__file__).parent
PACKAGE_NAME = "stepwise.clearml_server"
ENDPOINT_LINE = re.compile(r"^- `(?P<name>[a-z_]+\.[a-z_]+)` ")


def _printed_endpoints() -> list[str]:
    result = subprocess.run([sys.executable, "-m", "stepwise", "clearml-server", "--list-endpoints"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def _documented_endpoints() -> dict[str, str]:
    """``service.action`` -> the ``###`` heading it is listed under, from the "Implemented" section."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("\n## Implemented endpoints\n", 1)[1].split("\n## ", 1)[0]
    found: dict[str, str] = {}
    heading = ""
    for line in section.splitlines():
        if line.startswith("### "):
            heading = line[4:].strip()
        elif match := ENDPOINT_LINE.match(line):
            assert match["name"] not in found, f"{match['name']} is listed twice"
            found[match["name"]] = heading
    return found


@pytest.mark.integration
def test_printed_endpoints_are_the_documented_ones() -> None:
    printed = _printed_endpoints()
    documented = _documented_endpoints()
    assert printed == sorted(set(printed)), "the list is sorted, each endpoint once"
    assert all(re.fullmatch(r"[a-z_]+\.[a-z_]+", name) for name in printed), printed
    assert sorted(set(printed) - set(documented)) == [], "implemented but not in docs/clearml-server.md"
    assert sorted(set(documented) - set(printed)) == [], "in docs/clearml-server.md but not implemented"
    misplaced = {name: heading for name, heading in documented.items() if name.split(".")[0] != heading}
    assert misplaced == {}, "each endpoint is listed under its service's heading"
    # the SDK's login and event batches are among them (the HTTP front used to handle those two itself)
    assert {"auth.login", "events.add_batch", "tasks.get_all", "models.get_by_id"} <= set(printed)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function (``from a import b`` gives
    ``a.b`` when ``b`` is a module of the sub-package, else ``a``)."""
    names = set()
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).rstrip(".")
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                is_module = (PACKAGE.parent.parent / Path(*candidate.split("."))).with_suffix(".py").is_file() or (
                    PACKAGE.parent.parent / Path(*candidate.split(".")) / "__init__.py").is_file()
                names.add(candidate if is_module else base)
    return names


@pytest.mark.unit
def test_the_sub_package_has_no_import_cycle_and_no_ml_imports() -> None:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        imported = _imports(path)
        outside = sorted(name for name in imported if name.split(".")[0] == "stepwise"
                         and not (name == PACKAGE_NAME or name.startswith(PACKAGE_NAME + ".")))
        assert outside == [], f"{module} imports {outside}"
        ml = sorted(name for name in imported if name.split(".")[0] in ("torch", "numpy", "sentencepiece",
                                                                      "onnx", "onnxruntime"))
        assert ml == [], f"{module} imports {ml}"
        graph[module] = {name for name in imported if name.startswith(PACKAGE_NAME)}
    assert "stepwise.clearml_server.services.tasks" in graph, sorted(graph)

    def cycle_from(start: str, path: list[str]) -> list[str] | None:
        for nxt in sorted(graph.get(path[-1], ())):
            if nxt == start:
                return [*path, nxt]
            if nxt not in path and (found := cycle_from(start, [*path, nxt])):
                return found
        return None

    for module in graph:
        assert cycle_from(module, [module]) is None, " -> ".join(cycle_from(module, [module]) or [])
