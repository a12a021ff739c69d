"""The folder listing is the architecture: module sizes, docstrings, and the tree of the code in docs/architecture.md."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(p.relative_to(ROOT).as_posix() for package in ("pipeline", "storage")
                 for p in (ROOT / package).rglob("*.py"))
# Declarative tables may run longer than a function should.
LONG_TABLES = {"pipeline/cli.py:build_parser"}
ARCHITECTURE = "docs/architecture.md"


@pytest.mark.parametrize("module", MODULES)
def test_module_is_small_and_says_what_it_owns(module):
    source = (ROOT / module).read_text()
    tree = ast.parse(source)
    docstring = ast.get_docstring(tree)
    assert docstring and docstring.splitlines()[0].strip(), f"{module} needs a one-line docstring"
    assert source.count("\n") <= 300, f"{module} has {source.count(chr(10))} lines; split it along the flow"
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and f"{module}:{node.name}" not in LONG_TABLES:
            length = node.end_lineno - node.lineno + 1
            assert length <= 60, f"{module}:{node.name} is {length} lines long"


def documented_tree() -> set[str]:
    """The modules listed in the tree of docs/architecture.md, as repo-relative paths."""
    page = (ROOT / ARCHITECTURE).read_text()
    block = re.search(r"<!-- layout -->\n```\n(.*?)```", page, re.S)
    assert block, f"{ARCHITECTURE} needs the tree of the code between <!-- layout --> and a code fence"
    paths, stack = set(), []
    for line in block.group(1).splitlines():
        name = line.strip().split()[0] if line.strip() else ""
        if not name:
            continue
        depth = (len(line) - len(line.lstrip())) // 2
        stack = stack[:depth]
        if name.endswith("/"):
            stack.append(name.rstrip("/"))
        elif name.endswith(".py"):
            paths.add("/".join([*stack, name]))
    return paths


def test_documented_tree_matches_the_code():
    listed = documented_tree()
    actual = {m for m in MODULES if not m.endswith("__init__.py")}
    assert listed == actual, f"missing from {ARCHITECTURE}: {sorted(actual - listed)}; stale: {sorted(listed - actual)}"


def test_layering_contracts_hold_and_catch_an_upward_import(tmp_path):
    import shutil
    import subprocess
    import sys

    lint = Path(sys.executable).with_name("lint-imports")
    for name in ("pipeline", "storage", "pyproject.toml"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, tmp_path / name)
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    clean = subprocess.run([str(lint)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert clean.returncode == 0, clean.stdout[-2000:]
    recipe = tmp_path / "pipeline" / "train" / "recipe.py"
    recipe.write_text(recipe.read_text().replace("from pipeline import preempt\n",
                                                 "from pipeline import preempt\nimport pipeline.rounds.state\n"))
    broken = subprocess.run([str(lint)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert broken.returncode != 0
    assert "pipeline.train.recipe -> pipeline.rounds.state" in broken.stdout


def test_a_wheel_ships_the_templates_and_assets(tmp_path):
    """`distillery slurm` and the demo read package data, which must work outside an editable checkout."""
    import subprocess
    import sys
    import zipfile

    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                            "-w", str(tmp_path / "wheel")], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    with zipfile.ZipFile(next((tmp_path / "wheel").glob("*.whl"))) as wheel:
        wheel.extractall(tmp_path / "site")
    script = ("import sys; sys.path.insert(0, sys.argv[1])\n"
              "import pipeline; assert pipeline.__file__.startswith(sys.argv[1]), pipeline.__file__\n"
              "from pipeline.rounds.slurm import render\n"
              "from pipeline.demo.tokenizer import CORPUS, QA_CORPUS\n"
              "assert CORPUS.is_file() and QA_CORPUS.is_file()\n"
              "print(len(render('c.yaml', 1, 2, sys.argv[2], 'run')))\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "site"), str(tmp_path / "scripts")],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["4"]


def test_only_dist_reads_the_torchrun_environment():
    pattern = re.compile(r"environ(\.get)?\W+(RANK|WORLD_SIZE|LOCAL_RANK)")
    readers = [m for m in MODULES if pattern.search((ROOT / m).read_text())]
    assert readers == ["pipeline/dist.py"]


def test_benchmarks_use_the_storage_writer_and_no_working_directory():
    for module in (m for m in MODULES if m.startswith("pipeline/bench/")):
        source = (ROOT / module).read_text()
        assert "manifest.json" not in source and "write_json" not in source, f"{module} writes a manifest by hand"
        assert '"runs/' not in source and "Path.cwd" not in source and "getcwd" not in source, module
        assert not re.search(r"from pipeline\.\S+ import .*\b_[a-z]", source), f"{module} imports a private name"
