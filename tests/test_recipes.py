"""Every recipe shipped in recipes/ validates (`kbvq run --dry-run`)."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from kbvq_cli.app import app

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert len(RECIPES) >= 9


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_is_valid(recipe):
    result = CliRunner().invoke(app, ["run", "--recipe", str(recipe), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "is valid" in result.output
