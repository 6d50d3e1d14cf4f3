"""Every recipe shipped in recipes/ validates (`kbvq run --dry-run`) and is what the catalogue writes."""

import pytest
from typer.testing import CliRunner

from conftest import REPO
from kbvq_cli.app import app

RECIPES = sorted((REPO / "recipes").glob("**/*.yaml"))


def test_there_are_recipes():
    from kbvq_cli.catalogue import MODELS, VARIANTS

    assert len(RECIPES) == len(MODELS) * len(VARIANTS)


def test_recipes_are_what_the_catalogue_writes():
    from kbvq_cli.catalogue import write_recipes

    assert write_recipes(REPO / "recipes", check=True) == []


def test_the_catalogue_writes_the_repository_recipes_only_from_its_root(tmp_path, monkeypatch, capsys):
    from kbvq_cli.catalogue import main

    monkeypatch.chdir(tmp_path)
    assert main(["--check"]) == 2 and "from the kbvq repository's root" in capsys.readouterr().err
    assert not (tmp_path / "recipes").exists()
    monkeypatch.chdir(REPO)
    assert main(["--check"]) == 0 and "checked recipes" in capsys.readouterr().out


def test_every_table_row_has_a_recipe_and_a_paper_row():
    from kbvq_cli.catalogue import MODELS, TABLE_ROWS, VARIANTS, recipe_path
    from kbvq_cli.paper_tables import TABLE_LAYOUTS

    for table, rows in TABLE_ROWS.items():
        paper_rows = set(TABLE_LAYOUTS[table].rows)
        assert any((row.bits, row.method) in paper_rows for row in rows), table
        for row in rows:
            assert row.variant in VARIANTS
            assert all(recipe_path(model, row.variant).exists() for model in MODELS)


def test_dry_run_lists_the_method_stages(tmp_path):
    from kbvq_cli.catalogue import recipe_path

    result = CliRunner().invoke(app, ["run", "--recipe", str(recipe_path("qwen15-moe", "gptq-w2")), "--dry-run"])
    assert "method gptq" in result.output and "  gptq:" in result.output and "klt-svd" not in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\nmethod: awq\n")
    result = CliRunner().invoke(app, ["run", "--recipe", str(bad), "--dry-run"])
    assert result.exit_code == 2 and "method 'awq' is unknown" in result.output


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_is_valid(recipe):
    result = CliRunner().invoke(app, ["run", "--recipe", str(recipe), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "is valid" in result.output
