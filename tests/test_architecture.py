"""The architecture held by checks: no import circles, no crowded folders (docs/design.md).

The layers and the forbidden imports are import-linter contracts in pyproject.toml (`make lint`);
these tests add what a contract cannot say.
"""

from __future__ import annotations

from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("controlplane", "prober", "lab")
MAX_MODULES_PER_FOLDER = 12


def import_graph() -> grimp.ImportGraph:
    # Type-only imports (under TYPE_CHECKING) and imports inside functions count: both are
    # dependencies a reader has to hold in mind, and both make circles.
    return grimp.build_graph(*PACKAGES, exclude_type_checking_imports=False, cache_dir=None)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle (a list of modules, first == last), or None; deterministic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)) is not None:
            return found
    return None


def test_find_cycle_names_the_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_circles_between_modules() -> None:
    graph = import_graph()
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    cycle = find_cycle(edges)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("package", PACKAGES)
def test_no_folder_is_crowded(package: str) -> None:
    for folder in [ROOT / package, *(p for p in (ROOT / package).rglob("*") if p.is_dir())]:
        if folder.name == "__pycache__":
            continue
        modules = [p for p in folder.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
        assert len(modules) <= MAX_MODULES_PER_FOLDER, f"{folder.relative_to(ROOT)}: {len(modules)} modules"


def test_the_public_names_are_exactly_all() -> None:
    import controlplane

    assert sorted(controlplane.__all__) == controlplane.__all__
    for name in controlplane.__all__:
        assert getattr(controlplane, name).__name__ == name
    with pytest.raises(AttributeError):
        _ = controlplane.Faults  # type: ignore[attr-defined]


def test_the_topology_model_does_not_load_the_servers() -> None:
    import subprocess
    import sys

    code = (
        "import sys, controlplane.topology.model; "
        "print(sorted(m for m in ('aiohttp', 'controlplane.app') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"
