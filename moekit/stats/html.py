"""report.html: the Markdown report as one self-contained web page.

Converts the small Markdown subset that report.md uses (`#` headings, `-` lists, pipe tables,
`![alt](file.png)` images, `inline code`, paragraphs) and embeds every image as a base64
`data:` URI, so the page opens anywhere (mail, browser, CI artefact) without its folder.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}table{border-collapse:collapse;font-size:.9em;margin:1em 0}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f3f3f3}
img{max-width:100%;height:auto}code{background:#f3f3f3;padding:0 .2em}"""
IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}


def data_uri(path: Path) -> str:
    """`data:image/png;base64,...` of an image file."""
    mime = MIME.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def inline(text: str, folder: Path) -> str:
    """Escape `text` and render images (embedded from `folder`) and `code` spans."""
    out, last = [], 0
    for match in IMAGE.finditer(text):
        out.append(_code(html.escape(text[last:match.start()])))
        alt, src = html.escape(match[1]), folder / match[2]
        uri = data_uri(src) if src.is_file() else html.escape(match[2])
        out.append(f'<img alt="{alt}" src="{uri}">')
        last = match.end()
    out.append(_code(html.escape(text[last:])))
    return "".join(out)


def _code(escaped: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)


def _table(lines: list[str], folder: Path) -> str:
    """A pipe table: first line the header, second the rule, then the rows."""
    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    head = "".join(f"<th>{inline(c, folder)}</th>" for c in cells(lines[0]))
    rows = "".join("<tr>" + "".join(f"<td>{inline(c, folder)}</td>" for c in cells(line))
                   + "</tr>" for line in lines[2:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def markdown_to_html(markdown: str, folder: Path, title: str) -> str:
    """A complete HTML document for `markdown`; images are read from `folder` and embedded."""
    body: list[str] = []
    blocks = re.split(r"\n\s*\n", markdown.strip())
    for block in blocks:
        lines = block.splitlines()
        first = lines[0]
        if first.startswith("#"):
            level = min(len(first) - len(first.lstrip("#")), 6)
            body.append(f"<h{level}>{inline(first[level:].strip(), folder)}</h{level}>")
            lines = lines[1:]
            if not lines:
                continue
            first = lines[0]
        if first.startswith("|") and len(lines) > 1:
            body.append(_table(lines, folder))
        elif first.startswith("- "):
            items = "".join(f"<li>{inline(item[2:], folder)}</li>" for item in _items(lines))
            body.append(f"<ul>{items}</ul>")
        else:
            body.append(f"<p>{inline(' '.join(lines), folder)}</p>")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _items(lines: list[str]) -> list[str]:
    """List items; a line not starting with `- ` continues the previous item."""
    items: list[str] = []
    for line in lines:
        if line.startswith("- ") or not items:
            items.append(line)
        else:
            items[-1] += " " + line.strip()
    return items


def write_html(markdown_path: Path, title: str) -> Path:
    """Write `report.html` beside `markdown_path` (report.md) with its images embedded."""
    path = markdown_path.with_suffix(".html")
    path.write_text(markdown_to_html(markdown_path.read_text(), markdown_path.parent, title))
    return path
