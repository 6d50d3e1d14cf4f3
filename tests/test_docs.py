"""The method document is in the repository, and every section the code cites exists in it; no tracked
file names a path on a particular machine."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
CITATION = re.compile(r"(?:METHOD\.md|docs/method\.md) §(\d+)")
# a home, scratch or workspace directory of some machine; assembled so that this file does not match itself
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:" + "|".join(["wo" + "rk", "ro" + "ot", "ho" + "me", "tm" + "p"]) + r")/")


def tracked_files() -> list[Path]:
    result = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if result.returncode != 0:
        pytest.skip("not a git checkout")
    return [ROOT / name for name in result.stdout.decode().split("\0") if name]


def method_sections() -> dict[int, str]:
    return {int(number): title for number, title in re.findall(r"^## (\d+)\. (.+)$", METHOD.read_text(), re.M)}


def test_the_method_has_the_seven_sections_in_order():
    titles = method_sections()
    assert sorted(titles) == list(range(1, 8))
    for number, word in ((1, "Calibration"), (2, "IDRE"), (3, "VQ"), (4, "BCOS"), (5, "Storage"),
                         (6, "Evaluation"), (7, "Beyond the paper")):
        assert word in titles[number], titles[number]


def test_every_cited_section_exists():
    sections = method_sections()
    cited = {}
    for path in tracked_files():
        if path.suffix in (".py", ".md") and path.exists():
            for number in CITATION.findall(path.read_text(encoding="utf-8")):
                cited.setdefault(int(number), path.relative_to(ROOT))
    assert cited, "the code cites the method document"
    missing = {number: str(path) for number, path in cited.items() if number not in sections}
    assert not missing, missing


def test_no_tracked_file_names_a_machine_path():
    offenders = []
    for path in tracked_files():
        if not path.is_file() or path.suffix in (".csv", ".safetensors"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for match in MACHINE_PATH.finditer(text):
            offenders.append(f"{path.relative_to(ROOT)}:{text[:match.start()].count(chr(10)) + 1}")
    assert not offenders, offenders


def test_nothing_cites_the_method_outside_the_repository():
    """Citations name docs/method.md, the repository's own copy, never a method file kept elsewhere."""
    outside = "METHOD" + ".md"  # assembled so that this file does not match itself
    found = [f"{path.relative_to(ROOT)}" for path in tracked_files()
             if path.is_file() and path.suffix in (".py", ".md", ".txt", ".toml") and outside in path.read_text()]
    assert found == []
