"""The run report as blocks (headings, text, tables, figures), rendered twice: ``report.md`` and ``report.html``.

The HTML page is self-contained, so that it can be mailed or opened from an object store: the figures are
embedded as base64 PNG data URIs and the style sheet is inline (``templates/report.html``); nothing is fetched
from elsewhere. Text may mark ``code`` with backticks and **bold** with double asterisks, in both renderings.
"""
from __future__ import annotations

import base64
import html
import re
import string
from dataclasses import dataclass
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent / "templates" / "report.html"


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]
    wide: bool = False
    """Long texts in the cells (continuations): the HTML gives each column the same width and wraps them."""


@dataclass(frozen=True)
class Figure:
    name: str
    """A PNG in the run directory."""


Block = Heading | Text | Table | Figure


def _markdown_cell(text: str) -> str:
    """One table cell: pipes escaped, angle brackets as entities, line breaks as ``<br>``."""
    text = text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
    return "<br>".join(text.splitlines()) or " "


def to_markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Text):
            lines += [block.text, ""]
        elif isinstance(block, Table):
            lines += ["| " + " | ".join(block.header) + " |", "|" + "---|" * len(block.header)]
            lines += ["| " + " | ".join(_markdown_cell(c) for c in row) + " |" for row in block.rows] + [""]
        else:
            lines += [f"![{block.name}]({block.name})", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def _inline(text: str) -> str:
    """Escaped ``text`` with its backtick code spans and double-asterisk bold as HTML, line breaks kept."""
    escaped = html.escape(text)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    escaped = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)
    return escaped.replace("\n", "<br>")


NUMBER = re.compile(r"[-+]?[\d,]*\.?\d+(e[-+]?\d+)?")


def _html_cell(text: str) -> str:
    """A cell; figures align right, and the dash of a missing value in the middle."""
    kind = ' class="num"' if NUMBER.fullmatch(text) else ' class="none"' if text == "–" else ""
    return f"<td{kind}>{_inline(text)}</td>"


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{_inline(h)}</th>" for h in table.header)
    body = "".join("<tr>" + "".join(map(_html_cell, row)) + "</tr>" for row in table.rows)
    kind = "wide" if table.wide else "figures"
    table_html = f'<table class="{kind}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    return f'<div class="scroll">{table_html}</div>'


def _html_figure(figure: Figure, run_dir: Path) -> str:
    data = base64.b64encode((run_dir / figure.name).read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(figure.name)}" src="data:image/png;base64,{data}"></figure>'


def to_html(title: str, blocks: list[Block], run_dir: Path) -> str:
    """The page of ``blocks`` under ``title``; figures are read from ``run_dir``."""
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{_inline(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            parts.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Table):
            parts.append(_html_table(block))
        else:
            parts.append(_html_figure(block, run_dir))
    return string.Template(TEMPLATE.read_text()).substitute(title=html.escape(title), body="\n".join(parts))
