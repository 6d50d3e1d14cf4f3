"""Markdown building blocks of `report.md`, and the number formats the tests read back."""

from __future__ import annotations

from pathlib import Path


def fmt_ratio(value: float) -> str:
    """rho_k, similarities, drifts: six decimals."""
    return f"{value:.6f}"


def fmt_bits(value: float) -> str:
    """Bits per weight: four decimals."""
    return f"{value:.4f}"


def fmt_int(value: int) -> str:
    """Counts and bytes: plain digits (no separators), so they read back with int()."""
    return str(int(value))


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """A GitHub-flavoured markdown table; numbers right-aligned, the first column left-aligned."""
    align = ["---"] + ["---:"] * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def heading(text: str) -> list[str]:
    return [f"## {text}", ""]


def image(path: Path, caption: str) -> list[str]:
    """An image link relative to report.md (which sits next to its figures), then its caption."""
    return [f"![{caption}]({Path(path).name})", "", f"*{caption}*", ""]


def paragraph(text: str) -> list[str]:
    return [text, ""]


def skipped(reason: str) -> list[str]:
    """The line a section leaves when the stage it needs is absent: what to run to get it."""
    return [f"> Skipped: {reason}", ""]
