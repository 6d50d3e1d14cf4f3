"""The import rules of docs' code layout, checked on every module's syntax tree so they stay true.

- The library (everything under `kbvq_cli/` except the CLI layer) never imports a stage.
- A stage never imports another stage's modules except that stage's `reader`.
- Nothing imports the CLI layer but the CLI layer itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI_LAYER = {"kbvq_cli.app", "kbvq_cli.cli_errors", "kbvq_cli.pipeline", "kbvq_cli.tables", "kbvq_cli.__main__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, at any depth (imports inside functions count too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def violations() -> list[str]:
    problems = []
    for path in sorted([*ROOT.glob("kbvq_cli/**/*.py"), *ROOT.glob("stages/**/*.py")]):
        name = module_name(path)
        for line, imported in imported_modules(path):
            where = f"{path.relative_to(ROOT)}:{line} imports {imported}"
            if imported in CLI_LAYER and name not in CLI_LAYER:
                problems.append(f"{where}: only the CLI layer may import the CLI layer")
            if not imported.startswith("stages."):
                continue
            if name.startswith("kbvq_cli.") and name not in CLI_LAYER:
                problems.append(f"{where}: the library never imports a stage")
            if name.startswith("stages."):
                own, other = name.split(".")[1], imported.split(".")[1]
                module = imported.split(".")[2] if imported.count(".") >= 2 else ""
                if other != own and module != "reader":
                    problems.append(f"{where}: a stage reads another stage only through its reader")
    return problems


def test_imports_follow_the_layering():
    assert violations() == []


def test_the_check_sees_a_violation(tmp_path):
    """The walker finds imports inside functions, so a violation cannot hide there."""
    path = tmp_path / "module.py"
    path.write_text("def f():\n    from stages.vq.stage import run\n")
    assert (2, "stages.vq.stage") in imported_modules(path)
