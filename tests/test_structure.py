"""The package's module structure: no import cycles, and the world's text side never loads OpenCV."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import t2v

ROOT = pathlib.Path(t2v.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.Module, lazy: bool):
    """Import statements that run when the module is imported, and with lazy=True those in functions too."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif lazy or not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(node))


def import_graph(lazy: bool = False) -> dict[str, set[str]]:
    """module -> the modules of t2v it imports at top level (lazy=True: anywhere)."""
    files = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = graph.setdefault(name, set())
        for node in _imports(ast.parse(path.read_text(), str(path)), lazy):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in files)
                continue
            if node.level:
                base = package.split(".")
                base = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:  # `from pkg import submodule` imports the submodule, not only pkg
                sub = f"{base}.{alias.name}"
                deps.add(sub if sub in files else base)
        deps.intersection_update(files)
        deps.discard(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_import_graph_sees_relative_and_submodule_imports():
    graph = import_graph()
    assert "t2v.world.scene" in graph["t2v.world.render"]
    assert {"t2v.world.render", "t2v.world.scene"} <= graph["t2v.world"]
    assert "t2v.world.analyze" not in graph["t2v.world"]  # the package init stays free of OpenCV
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_of_t2v_takes_part_in_an_import_cycle():
    """Counting imports inside functions too: a lazy import may put off a heavy dependency, never hide a cycle."""
    for lazy in (False, True):
        cycle = find_cycle(import_graph(lazy=lazy))
        assert cycle is None, "import cycle: " + " -> ".join(cycle)


MAX_MODULE_LINES = 450


def test_no_module_of_t2v_is_over_450_lines():
    """A module past a few screens holds more than one thing: split it along what it holds."""
    long = {str(p.relative_to(ROOT)): n for p in sorted(ROOT.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_text_parsing_does_not_load_opencv():
    """Prompt parsing is all words: it must work (and stay cheap) where OpenCV is absent or slow to load."""
    code = ("import sys, t2v.world.parse\n"
            "import t2v.production.prompting as prompting\n"
            "prompting.zero_shot = lambda *args, **kwargs: None  # the MiniLM encoder is not under test\n"
            "analysis = prompting.analyze_text('a small red ball moving left above a blue star at sunset')\n"
            "assert analysis.world['objects'][0]['color'] == 'red', analysis.world\n"
            "prompting.world_caption(analysis.world)\n"
            "assert 'cv2' not in sys.modules, 'cv2 was imported'\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def family_branches(root: pathlib.Path = ROOT) -> list[str]:
    """`... == "wan"` / `is FAMILIES["unet3d"]`-style comparisons with a family's name outside families/."""
    from t2v.families import FAMILIES

    names, hits = set(FAMILIES), []
    for path in sorted(root.rglob("*.py")):
        if "families" in path.relative_to(root).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Compare):
                consts = {n.value for n in ast.walk(node) if isinstance(n, ast.Constant)}
                if consts & names:
                    hits.append(f"{path.relative_to(root.parent)}:{node.lineno}")
    return hits


def test_nothing_outside_families_branches_on_a_family(tmp_path):
    assert family_branches() == []
    (tmp_path / "loop.py").write_text('def f(bundle):\n    if bundle.family.name == "unet3d":\n        return 1\n')
    assert family_branches(tmp_path) == [f"{tmp_path.name}/loop.py:2"]
