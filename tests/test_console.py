"""Messages print literally, square brackets included (rich markup would swallow `[eval]` in
`pip install 'kbvq[eval]'`), while kbvq's own styling (red `error:`, yellow `warning:`, bold headings) stays."""

import pytest

from cli_util import invoke
from kbvq_cli import console as terminal

TRICKY = "pip install 'kbvq[eval]' [bold]x[/bold] :smile:"


def test_an_error_naming_bracketed_values_prints_them_literally(tmp_path):
    recipe = tmp_path / "kbvq[eval]" / "recipe.yaml"
    recipe.parent.mkdir()
    recipe.write_text('"[bold]x[/bold]": 1\n')
    result = invoke("run", "--recipe", recipe, "--dry-run", code=2)
    (line,) = [line for line in result.output.splitlines() if line.strip()]
    assert line.startswith(f"error: recipe {recipe}: unknown key(s) [bold]x[/bold]; allowed: ")


def test_info_prints_a_bracketed_model_name_literally(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: models/kbvq[eval]/[bold]x[/bold]\nmethod: fp16\n")
    output = " ".join(invoke("run", "--recipe", recipe, "--dry-run").output.split())  # rich folds long lines
    assert "is valid: model models/kbvq[eval]/[bold]x[/bold], method fp16" in output


@pytest.fixture
def recorded(monkeypatch):
    """kbvq's console, recording what it prints (rich's own record buffer), its styles exported as ANSI."""
    monkeypatch.setattr(terminal.console, "record", True)
    terminal.console.export_text()  # start from an empty record

    def exported(styles: bool) -> str:
        return terminal.console.export_text(styles=styles)

    return exported


@pytest.mark.parametrize("show, prefix, style", [
    (terminal.info, "", None),
    (terminal.warn, "warning: ", "\x1b[33mwarning:\x1b[0m "),  # yellow
    (terminal.error, "error: ", "\x1b[31merror:\x1b[0m "),  # red
    (terminal.heading, "", "\x1b[1m"),  # bold
])
def test_messages_print_literally_and_keep_kbvq_styling(show, prefix, style, recorded):
    show(TRICKY)
    assert recorded(styles=False) == prefix + TRICKY + "\n"
    show(TRICKY)
    styled = recorded(styles=True)
    if style is not None:
        assert styled.startswith(style)
    assert TRICKY in styled
