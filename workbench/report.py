"""Reports: one list of blocks rendered twice, as standalone HTML and as Markdown.

HTML embeds its figures as base64 PNG, so `report.html` opens anywhere with nothing beside it;
`report.md` links the same figures saved as PNG files in the report folder.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

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
class Figure_:
    """A matplotlib figure, saved as `name`.png."""

    figure: Figure
    name: str
    caption: str = ""


Block = Text | Heading | Table | Figure_


def _fmt(value: object, digits: int) -> str:
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
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; max-width: 1050px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #f2f2f2; }
td:first-child, th:first-child { text-align: left; }
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
            body.append(f"<h{block.level}>{html.escape(block.title)}</h{block.level}>")
        elif isinstance(block, Text):
            md += [block.body, ""]
            body.append(f"<p>{_inline_html(block.body)}</p>")
        elif isinstance(block, Table):
            md += [_md_table(block), ""]
            frame = block.frame.map(lambda v, d=block.digits: _fmt(v, d))
            body.append(frame.to_html(index=False, escape=True, border=0))
            if block.caption:
                body.append(f'<p class="caption">{_inline_html(block.caption)}</p>')
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
