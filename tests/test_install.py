"""What a fresh machine gets: every import is a declared dependency of the right group, every module imports,
constraints.txt pins versions inside the declared ranges, and the README's two commands are the ones CI and
the Dockerfile use."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

import t2v
from conftest import needs_program

ROOT = Path(__file__).resolve().parents[1]
# Who imports a module -> the groups of pyproject.toml that may declare it. The library and what
# `ray job submit` runs get the runtime dependencies only; tests, benchmarks and dev tools also the test extra.
GROUPS = {"t2v": ("runtime",), "jobs": ("runtime",), "bench": ("runtime", "test"), "tests": ("runtime", "test"),
          "k8s": ("runtime", "test")}
DYNAMIC_IMPORTERS = {"importorskip", "import_module"}  # pytest.importorskip("x"), importlib.import_module("x")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(pyproject: Path) -> dict[str, set[str]]:
    """{"runtime": names, "test": names} of pyproject.toml's dependencies (normalized distribution names)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    groups = {"runtime": project.get("dependencies", [])}
    groups.update(project.get("optional-dependencies", {}))
    return {group: {normalize(Requirement(r).name) for r in reqs} for group, reqs in groups.items()}


def imported_modules(path: Path):
    """(top-level module, line) for every absolute import in a file, and for string-named dynamic imports."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) in DYNAMIC_IMPORTERS
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and not node.args[0].value.startswith(".")):
            names = [node.args[0].value]
        else:
            continue
        for name in names:
            yield name.split(".")[0], node.lineno


def undeclared_imports(root: Path) -> list[str]:
    """One line per third-party import whose distribution the importing folder's groups do not declare."""
    groups = declared(root / "pyproject.toml")
    owners = {module: {normalize(d) for d in dists} for module, dists in packages_distributions().items()}
    files = {folder: sorted((root / folder).rglob("*.py")) for folder in GROUPS if (root / folder).is_dir()}
    local = {"t2v"} | {p.stem for paths in files.values() for p in paths} | {
        p.parent.name for paths in files.values() for p in paths if p.name == "__init__.py"}
    problems = []
    for folder, paths in files.items():
        allowed = set().union(*(groups.get(g, set()) for g in GROUPS[folder]))
        for path in paths:
            for module, line in imported_modules(path):
                if module in sys.stdlib_module_names or module in local:
                    continue
                where = f"{path.relative_to(root)}:{line}"
                dists = owners.get(module)
                if not dists:
                    problems.append(f"{where} imports {module}, which no installed distribution provides "
                                    f"(declare it in pyproject.toml: {' or '.join(GROUPS[folder])})")
                elif not dists & allowed:
                    problems.append(f"{where} imports {module} (distribution {', '.join(sorted(dists))}), "
                                    f"not declared in {' or '.join(GROUPS[folder])} dependencies")
    return problems


def test_every_third_party_import_is_declared_for_the_folder_that_imports_it():
    problems = undeclared_imports(ROOT)
    assert not problems, "undeclared imports:\n" + "\n".join(problems)


def _tree_with(tmp_path: Path, pyproject: str, files: dict[str, str]) -> Path:
    (tmp_path / "pyproject.toml").write_text(pyproject)
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_the_check_names_the_module_and_file_when_a_dependency_line_is_removed(tmp_path):
    text = (ROOT / "pyproject.toml").read_text()
    without_opencv = "\n".join(line for line in text.splitlines() if "opencv-python-headless" not in line)
    root = _tree_with(tmp_path, without_opencv, {
        "t2v/analyze.py": "import numpy\nimport cv2\n",
        "t2v/uses_a_test_only_package.py": "from moto import mock_aws\n",
        "tests/test_x.py": "import pytest\nplaywright = pytest.importorskip('playwright.sync_api')\n",
        "tests/test_y.py": "import not_a_real_package_anywhere\n",
    })
    problems = undeclared_imports(root)
    assert any(p.startswith("t2v/analyze.py:2 imports cv2") for p in problems), problems
    assert any(p.startswith("t2v/uses_a_test_only_package.py:1 imports moto") and "runtime" in p for p in problems)
    assert any(p.startswith("tests/test_y.py:1 imports not_a_real_package_anywhere") for p in problems)
    assert len(problems) == 3, problems  # numpy is runtime, playwright is a declared test dependency


def test_every_module_of_the_package_imports():
    names = [m.name for m in pkgutil.walk_packages(t2v.__path__, "t2v.") if not m.name.endswith("__main__")]
    assert len(names) > 40
    for name in names:
        importlib.import_module(name)


def test_constraints_pin_every_declared_dependency_inside_its_range():
    """constraints.txt is `pip freeze` of the last green fresh-venv run: `pip install -c constraints.txt`
    reproduces it, so each declared dependency's pin must satisfy the declared range."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[normalize(name)] = Version(version)
    reqs = project["dependencies"] + [r for group in project["optional-dependencies"].values() for r in group]
    for req in map(Requirement, reqs):
        if req.marker and not req.marker.evaluate():
            continue
        pin = pins.get(normalize(req.name))
        assert pin is not None, f"{req.name} is declared but constraints.txt has no pin for it"
        assert req.specifier.contains(pin, prereleases=True), f"constraints.txt pins {req.name}=={pin}, outside {req}"
        if normalize(req.name) in {"diffusers", "transformers", "ray", "torch", "av", "pyarrow", "fastapi", "openai",
                                   "accelerate"}:
            assert any(s.operator in ("<=", "<", "==") for s in req.specifier), f"{req} has no upper bound"


def readme_commands() -> list[str]:
    block = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    return block.strip().splitlines()


def test_ci_runs_the_readme_test_command_in_a_fresh_virtualenv():
    install_and_test = readme_commands()[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert install_and_test in ci.splitlines()
    assert "python3 -m venv" in ci and "rm -rf" in ci


NO_SUCH_PACKAGE = "t2v-ci-no-such-package"


@needs_program("chromium")
@needs_program("espeak-ng")
def test_ci_fails_when_the_install_fails(tmp_path):
    """.ci/run, copied as it is, on a project whose install cannot succeed (its build needs a package that does
    not exist): CI must exit non-zero and run no test. Before the fix it printed its last line and exited 0."""
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / "pyproject.toml").write_text(
        f'[build-system]\nrequires = ["{NO_SUCH_PACKAGE}"]\nbuild-backend = "setuptools.build_meta"\n\n'
        '[project]\nname = "t2v-ci-probe"\nversion = "0"\n\n[project.optional-dependencies]\ntest = []\n')
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_would_pass.py").write_text("def test_passes():\n    assert True\n")
    # Offline (no index: the unknown name is refused from the local wheels alone) and with CI's own environment.
    env = {**os.environ, "PIP_NO_INDEX": "1", "TMPDIR": str(tmp_path), "CI": "true"}
    env.pop("VIRTUAL_ENV", None)
    r = subprocess.run(["bash", ".ci/run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
                       stdin=subprocess.DEVNULL)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert NO_SUCH_PACKAGE in out, out  # it failed where it should: pip could not install the build requirement
    assert not re.search(r"\d+ passed", out), out
    assert f"exit status {r.returncode}" in r.stdout, r.stdout


def test_the_dockerfile_installs_the_declared_set_with_the_constraints():
    dockerfile = (ROOT / "Dockerfile").read_text()
    lines = [line for line in dockerfile.splitlines() if line.startswith("RUN pip install")]
    assert any("-c constraints.txt ." in line for line in lines), lines
    ray_pin = next(line for line in (ROOT / "constraints.txt").read_text().splitlines() if line.startswith("ray=="))
    assert f"FROM rayproject/ray:{ray_pin.split('==')[1]}-" in dockerfile  # the image's Ray is the tested one
    for line in lines:  # nothing but torch's CUDA build (matching the pinned version) and t2v itself
        words = [w for w in shlex.split(line)[3:] if not w.startswith("-") and w not in ("constraints.txt", ".")]
        assert all(w.startswith("torch==") or w.startswith("https://") for w in words), line


def test_the_readme_first_command_writes_the_video(tmp_path):
    """README line 1, after its install: the embedded model, default settings, an mp4 in the working folder."""
    install_and_generate = readme_commands()[0]
    generate = install_and_generate.split("&&", 1)[1].strip()
    assert generate.startswith("t2v generate ")
    argv = shlex.split(generate)
    console_script = Path(sys.executable).parent / "t2v"  # what pip installed for [project.scripts]
    r = subprocess.run([str(console_script), *argv[1:], "--quiet"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    from t2v.video import probe

    out = tmp_path / argv[argv.index("-o") + 1]
    assert probe(out).num_frames == 17
