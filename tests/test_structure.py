"""The package's module structure: no import cycles, no long modules, the world's text side never loads OpenCV,
and no file written to a local disk where another node would have to read it."""

from __future__ import annotations

import ast
import pathlib

import t2v
from conftest import fresh_python

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
            "analysis = prompting.analyze_text('a small red ball moving left above a blue star at sunset',\n"
            "                                  zero_shot=False)  # the MiniLM encoder is not under test\n"
            "assert analysis.world['objects'][0]['color'] == 'red', analysis.world\n"
            "prompting.world_caption(analysis.world)\n"
            "assert 'cv2' not in sys.modules, 'cv2 was imported'\n")
    run = fresh_python(code)
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


# Every place t2v writes a file to a local path outside a temporary folder of its own, and why no other node
# reads it. What a stage hands to a stage on another node goes through t2v.storage (s3:// on a cluster) or Ray's
# object store; tests/test_multinode.py checks the same at run time with an audit of every file opened.
LOCAL_WRITES = {
    "storage.py:download_dir": "the storage layer: a downloaded model's folder, read by the process that made it",
    "data/rendered.py:start": "the one-machine recipe of the embedded model (jobs/train_default.py)",
    "data/rendered.py:save_encoded": "the one-machine recipe's encoded clips (jobs/train_default.py, bench/)",
    "data/shards.py:write_shard": "into a BytesIO; the shard goes out through storage.write_bytes",
    "train/loop.py:save": "into a BytesIO; the checkpoint goes out through storage.write_bytes",
    "train/ray.py:fit": "the user's own local storage_path (one machine); a cluster gives s3://",
    "train/ray.py:metrics_log": "a callback of the Ray Train controller, which runs on the driver's node",
    "train/ray.py:after_report": "(metrics_log's callback method)",
    "video.py:_encode_to_file": "the caller's path: encode_video gives a temporary folder; the CLI the user's file",
    "serve/process.py:__init__": "`serve run`'s log, on the machine that runs it",
    "serve/process.py:serve_shipped_config": "the config `serve run` reads, on the same machine",
    "production/programs.py:write_program": "`t2v program`'s output folder, on the user's machine",
}
WRITE_CALLS = {"write_text", "write_bytes", "save_pretrained", "save_file", "write_table", "to_parquet", "mkdtemp",
               "makedirs", "mkdir"}


def local_writes(tree: ast.Module) -> set[str]:
    """Functions that write a local file (open for writing, Path.write_*, torch.save, save_pretrained, ...)
    without making a temporary folder of their own (a `tempfile.` call in the same function)."""
    found = set()
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        calls = [c for c in ast.walk(fn) if isinstance(c, ast.Call)]
        if any(isinstance(c.func, ast.Attribute) and getattr(c.func.value, "id", "") == "tempfile" for c in calls):
            continue
        for c in calls:
            name = c.func.attr if isinstance(c.func, ast.Attribute) else getattr(c.func, "id", "")
            owner = getattr(getattr(c.func, "value", None), "id", "")
            if name == "open" and owner in ("", "av", "io"):
                mode = c.args[1] if len(c.args) > 1 else next((k.value for k in c.keywords if k.arg == "mode"), None)
                writes = isinstance(mode, ast.Constant) and bool(set(str(mode.value)) & set("wax+"))
            else:
                writes = (name in WRITE_CALLS and owner != "storage") or (name, owner) == ("save", "torch")
            if writes:
                found.add(fn.name)
    return found


def test_a_new_local_file_write_is_a_decision_about_other_nodes():
    """The local writes of t2v are exactly those listed, each with why no other node reads the file."""
    found = {f"{p.relative_to(ROOT)}:{fn}" for p in sorted(ROOT.rglob("*.py"))
             for fn in local_writes(ast.parse(p.read_text()))}
    listed = set(LOCAL_WRITES)
    assert found == listed, {"new (write through t2v.storage, or list it)": sorted(found - listed),
                             "gone (drop from the list)": sorted(listed - found)}


def test_the_local_write_check_sees_a_write_outside_a_temporary_folder():
    tree = ast.parse("import tempfile\n"
                     "def a(p):\n    open(p, 'wb').write(b'')\n"
                     "def b(p):\n    p.write_text('x')\n"
                     "def c(p, s):\n    torch.save(s, p)\n"
                     "def d(p):\n    with tempfile.TemporaryDirectory() as t:\n        open(t + '/x', 'w')\n"
                     "def e(p):\n    open(p).read()\n    storage.write_bytes(p, b'')\n")
    assert local_writes(tree) == {"a", "b", "c"}
