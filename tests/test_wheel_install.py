"""A regular (non-editable) install works: a wheel of the repository, installed into a plain directory,
runs the CLI from another working directory with the repository off the import path, and finds the
recipes and the paper's numbers it ships."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from kbvq_cli.paper_tables import PAPER_CELLS, format_value

pytestmark = pytest.mark.slow  # real pip and python subprocesses (about 20 s)

# What the wheel is built from; copied, so that the build writes nothing into the repository and a stale
# build/ directory there cannot put files into the wheel that the sources no longer have.
SOURCES = ("pyproject.toml", "README.md", "kbvq_cli", "stages", "recipes", "tables")


def _dependency_path() -> list[str]:
    """This interpreter's import path without the repository: any entry holding kbvq_cli is dropped."""
    return [entry for entry in sys.path if entry and not (Path(entry) / "kbvq_cli").exists()]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The directory a wheel of the repository was installed into with `pip install --target`."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():  # symlinks=True keeps kbvq_cli/recipes a link to the copied recipes/
            shutil.copytree(REPO / name, source / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(root / "dist"),
                    str(source)], check=True, capture_output=True)
    (wheel,) = (root / "dist").glob("kbvq-*.whl")
    target = root / "target"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    return target


def python(installed: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`python ARGS` importing kbvq from `installed` only: -S skips site-packages' .pth files (an editable
    install's import hook would otherwise find, in the repository, modules the wheel lacks), and the
    dependencies come from this interpreter's path."""
    # COLUMNS: rich folds long lines, paths included, at the terminal width (80 without a terminal).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed), *_dependency_path()]), "COLUMNS": "1000"}
    return subprocess.run([sys.executable, "-S", *args], cwd=cwd, env=env, capture_output=True, text=True)


def kbvq(installed: Path, cwd: Path, *args: str) -> str:
    """`python -m kbvq_cli ARGS`, run as `python` runs; its output."""
    result = python(installed, cwd, "-m", "kbvq_cli", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_the_wheel_holds_every_package_recipe_and_the_paper_csv(installed):
    def packages(root: Path) -> set[str]:
        return {str(init.parent.relative_to(root))
                for top in ("kbvq_cli", "stages") for init in (root / top).rglob("__init__.py")}

    def files(root: Path) -> set[str]:
        return {str(path.relative_to(root)) for path in root.rglob("*") if path.is_file()}

    assert packages(installed) == packages(REPO)
    assert files(installed / "kbvq_cli" / "recipes") == files(REPO / "recipes")
    assert files(installed / "kbvq_cli" / "paper_data") == {"paper.csv", "README.md"}


def test_the_installed_cli_runs_outside_the_repository(installed, tmp_path):
    origin = python(installed, tmp_path, "-c", "import kbvq_cli, stages; print(kbvq_cli.__file__, stages.__file__)")
    assert origin.returncode == 0, origin.stderr
    assert all(Path(path).is_relative_to(installed) for path in origin.stdout.split()), origin.stdout

    recipe = installed / "kbvq_cli" / "recipes" / "testbed-mini" / "kbvq-w2.yaml"
    plan = kbvq(installed, tmp_path, "run", "--recipe", str(recipe), "--dry-run")
    assert f"recipe {recipe} is valid: model testbed-mini, method kbvq, run runs/testbed-mini/kbvq-w2" in plan
    assert "vq: bits=2," in plan and "eval: target=packed, ppl_data=testbed-mini/test.txt" in plan

    # The paper's side of a table comes from the shipped paper.csv; nothing has run, so ours is "—".
    kbvq(installed, tmp_path, "table", "1", "--model", "qwen15-moe", "--no-run", "--markdown", "t1.md")
    (paper,) = [cell for cell in PAPER_CELLS if (cell.table, cell.model, cell.bits, cell.method, cell.metric)
                == ("1", "qwen15-moe", 2, "kbvq", "wikitext2_ppl")]
    assert f"| 2 | kbvq | — / {format_value(paper.metric, paper.value)} |" in (tmp_path / "t1.md").read_text()
    assert not (tmp_path / "runs").exists()


def test_the_installed_table_runs_a_shipped_recipe_on_the_mini_test_bed(installed, testbed_mini_short, tmp_path):
    # The recipes name the test-bed and their run directories relative to the working directory.
    (tmp_path / "testbed-mini").symlink_to(testbed_mini_short)
    fp16 = installed / "kbvq_cli" / "recipes" / "testbed-mini" / "fp16.yaml"
    kbvq(installed, tmp_path, "run", "--recipe", str(fp16))
    (entry,) = json.loads((tmp_path / "runs/testbed-mini/fp16/eval/results.json").read_text())["entries"].values()
    kbvq(installed, tmp_path, "table", "1", "--model", "testbed-mini", "--no-run", "--markdown", "t1.md")
    assert f"| 16 | fp16 | {entry['ppl']:.2f} / — |" in (tmp_path / "t1.md").read_text()
