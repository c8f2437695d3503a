"""Reports: one list of blocks rendered twice, as standalone HTML and as Markdown.

HTML embeds its figures as base64 PNG, so `report.html` opens anywhere with nothing beside it;
`report.md` links the same figures saved as PNG files in the report folder.
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass
class Text:
    """A paragraph; `**bold**` and `code` in backticks survive in both formats."""

    body: str


@dataclass
class Heading:
    title: str
    level: int = 2


@dataclass
class Table:
    frame: pd.DataFrame
    caption: str = ""
    digits: int = 3


@dataclass
class Callout:
    """A boxed warning shown where a reader cannot miss it (e.g. a run whose answers all
    failed to parse); Markdown renders it as a block quote."""

    body: str
    title: str = "Warning"


@dataclass
class Figure_:
    """A matplotlib figure, saved as `name`.png."""

    figure: Figure
    name: str
    caption: str = ""


Block = Text | Heading | Table | Callout | Figure_


def plural(n: int, word: str, many: str | None = None) -> str:
    """`n` and `word`, pluralized: "1 question", "2 questions", "0 questions"; `many` is an
    irregular plural (`plural(3, "child", "children")` is "3 children")."""
    return f"{n:,} {word if n == 1 else (many or word + 's')}"


def _fmt(value: object, digits: int) -> str:
    if value is None or value is pd.NA:
        return ""
    if isinstance(value, float):
        return "" if value != value else f"{value:.{digits}f}"
    return str(value)


def _md_table(table: Table) -> str:
    frame = table.frame
    cols = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in frame.itertuples(index=False):
        lines.append(
            "| " + " | ".join(_fmt(v, table.digits).replace("|", "\\|") for v in row) + " |"
        )
    caption = f"\n\n*{table.caption}*" if table.caption else ""
    return "\n".join(lines) + caption


def _inline_html(text: str) -> str:
    out = html.escape(text)
    parts = out.split("`")
    out = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    parts = out.split("**")
    out = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
    # *italic* outside code spans (a lone "*" as in "age=*" stays as it is)
    parts = re.split(r"(<code>.*?</code>)", out)
    return "".join(p if p.startswith("<code>") else _ITALIC.sub(r"<i>\1</i>", p) for p in parts)


_ITALIC = re.compile(r"(?<![^\s(\[\"'])\*(?=\S)([^*<>]+?)(?<=\S)\*(?![^\s.,;:!?)\]\"'])")


def _is_number(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float | np.number):
        return True
    # "0.123 [0.100, 0.150]": a value with its interval reads as one number, never wrapped
    return isinstance(value, str) and _NUMERIC.fullmatch(value) is not None


_NUMERIC = re.compile(r"[-+]?[\d.,e+-]*\d%?( \[[-+\d.,e ]+\])?")


def _header_html(name: object) -> str:
    # a long snake_case header may break after an underscore instead of widening its column
    text = html.escape(str(name))
    return text.replace("_", "_<wbr>") if len(text) > 12 else text


SHORT_TEXT = 32
"""Text cells up to this many characters never wrap (names, labels); longer ones do."""


def _cell_class(value: object, text: str) -> str:
    if _is_number(value):
        return "num"
    return "txt short" if len(text) <= SHORT_TEXT else "txt"


def _html_table(table: Table) -> str:
    frame = table.frame
    head = "".join(f"<th>{_header_html(c)}</th>" for c in frame.columns)
    rows = []
    for row in frame.itertuples(index=False):
        cells = "".join(
            f'<td class="{_cell_class(v, text)}">{html.escape(text)}</td>'
            for v in row
            for text in (_fmt(v, table.digits),)
        )
        rows.append(f"<tr>{cells}</tr>")
    caption = f'<p class="caption">{_inline_html(table.caption)}</p>' if table.caption else ""
    return (
        f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>{caption}"
    )


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; max-width: 1050px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #ccc; }
/* scrolls sideways inside the page; the shadows at the edges say there is more */
.table-wrap { overflow-x: auto; max-width: 100%; margin: .8em 0;
  background: linear-gradient(to right, #fff 30%, #fff0) left / 40px 100% no-repeat local,
    linear-gradient(to left, #fff 30%, #fff0) right / 40px 100% no-repeat local,
    radial-gradient(farthest-side at 0 50%, #0003, #0000) left / 12px 100% no-repeat scroll,
    radial-gradient(farthest-side at 100% 50%, #0003, #0000) right / 12px 100% no-repeat scroll; }
table { border-collapse: collapse; font-size: .85em; }
th, td { border: 1px solid #ccc; padding: .25em .5em; vertical-align: top; }
th { background: #f2f2f2; text-align: left; max-width: 11em; font-weight: 600; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
td.txt { text-align: left; min-width: 14em; overflow-wrap: break-word; }
td.short { white-space: nowrap; min-width: 0; }
.callout { border-left: 4px solid #c0392b; background: #fdecea; padding: .5em .9em;
           margin: 1em 0; }
.callout b:first-child { color: #a52a1a; }
figure { margin: 1em 0; } figcaption, .caption { color: #555; font-size: .9em; }
img { max-width: 100%; } code { background: #f4f4f4; padding: 0 .2em; }
.meta { color: #666; font-size: .85em; }
"""


def write_report(out_dir: str | Path, title: str, blocks: Sequence[Block]) -> tuple[Path, Path]:
    """Write `report.html` (standalone) and `report.md` (+ PNG figures) to `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    md = [f"# {title}", "", f"*generated {stamp}*", ""]
    body = [f"<h1>{html.escape(title)}</h1>", f'<p class="meta">generated {stamp}</p>']
    for block in blocks:
        if isinstance(block, Heading):
            md += ["#" * block.level + " " + block.title, ""]
            body.append(f"<h{block.level}>{_inline_html(block.title)}</h{block.level}>")
        elif isinstance(block, Text):
            md += [block.body, ""]
            body.append(f"<p>{_inline_html(block.body)}</p>")
        elif isinstance(block, Table):
            md += [_md_table(block), ""]
            body.append(_html_table(block))
        elif isinstance(block, Callout):
            md += [f"> **{block.title}:** {block.body}", ""]
            body.append(
                f'<div class="callout" role="alert"><b>{html.escape(block.title)}:</b> '
                f"{_inline_html(block.body)}</div>"
            )
        else:
            png = _png(block.figure)
            (out / f"{block.name}.png").write_bytes(png)
            md += [f"![{block.caption or block.name}]({block.name}.png)", ""]
            if block.caption:
                md += [f"*{block.caption}*", ""]
            data = base64.b64encode(png).decode()
            cap = f"<figcaption>{_inline_html(block.caption)}</figcaption>" if block.caption else ""
            body.append(
                f'<figure><img alt="{html.escape(block.name)}" src="data:image/png;base64,{data}">{cap}</figure>'
            )
            import matplotlib.pyplot as plt

            plt.close(block.figure)
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text(page, encoding="utf-8")
    md_path.write_text("\n".join(md), encoding="utf-8")
    return html_path, md_path
