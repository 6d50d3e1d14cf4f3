"""The data files kbvq ships inside its package: the recipes and the paper's numbers.

They live at the repository's top level (`recipes/`, `tables/`), where people read and edit them, and
`kbvq_cli/recipes` and `kbvq_cli/paper_data` are symbolic links to those two directories, so that the
same files are package data of `kbvq_cli` (pyproject's package-data) and are found through
importlib.resources however kbvq is imported: an installed wheel (the links' targets are copied into
it), an editable install, or a source tree on PYTHONPATH. A package-dir mapping of the two directories
would be found only through the install's own import hook, and an uninstalled tree or one worktree
importing beside another's editable install would miss them or read the other tree's files.
Imports only the standard library: `kbvq table --help` and `paper_tables` stay cheap.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from kbvq_cli.errors import KbvqError


def _shipped(name: str) -> Path:
    found = resources.files("kbvq_cli").joinpath(name)
    # kbvq is installed as plain files (pip unpacks wheels), never run from a zip: recipes are read and
    # named by path (`kbvq run --recipe PATH`), so a path is what callers need.
    if not isinstance(found, Path) or not found.is_dir():
        raise KbvqError(f"kbvq's shipped {name} directory is missing ({found}); reinstall kbvq, or, in a source "
                        f"checkout, check out kbvq_cli/{name} as the symbolic link it is (git core.symlinks)")
    return found


def recipes_dir() -> Path:
    """The shipped recipes: `recipes_dir() / MODEL / VARIANT.yaml` (written by kbvq_cli.catalogue)."""
    return _shipped("recipes")


def paper_csv() -> Path:
    """The paper's numbers, Tables 1-17 (tables/paper.csv; its ids are described in tables/README.md)."""
    return _shipped("paper_data") / "paper.csv"
