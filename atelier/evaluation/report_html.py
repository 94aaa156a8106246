"""One self-contained HTML page for a retrieval evaluation: tables, sample grids, and per condition
what was asked, what was drawn, what was judged and what was retrieved (hit or miss).

    report   {"title": str, "settings": {name: value}, "tables": [table, ...]}, every key optional;
             a table is (title, header, rows) with header a list of str and rows lists of str
             (what `compare.tables` gives), or {"title", "header", "rows"}, or
             {"title", "markdown"} (shown as preformatted text)
    visuals  {model name: {"grid_png": bytes | None,
                           "conditions": [{"condition": {group: value},
                                           "samples_png": bytes,       # the generated samples strip
                                           "judged": {group: value} | None,
                                           "retrieved": [{"id": str, "png": bytes, "attributes": {group: value}}]}]}}

Images may be PNG bytes or uint8 arrays (H, W, C) (encoded here); they are inlined as base64
data URIs, so the file needs nothing beside it. All text is escaped. Marks: an asked attribute
of a retrieved product (or of the judged attributes) is "hit" when it matches the asked value
(`atelier.retrieval.precision.has_value`) and "miss" otherwise; a product is a hit when all of them are.
"""

from __future__ import annotations

import base64
import html
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from atelier.catalog.images import encode_png
from atelier.retrieval.precision import has_value

CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; font-size: 0.9em; }
th { background: #f3f3f3; }
img { image-rendering: pixelated; }
.grid img { max-width: 100%; }
.condition { border-top: 1px solid #ddd; padding: 0.6em 0; display: flex; flex-wrap: wrap; gap: 1em; }
.condition > div { min-width: 9em; }
.samples img { height: 96px; }
.products { display: flex; flex-wrap: wrap; gap: 0.5em; }
figure { margin: 0; padding: 0.3em; border: 3px solid #ccc; font-size: 0.8em; width: 8em; }
figure img { width: 100%; }
figure.hit { border-color: #2a9d3a; }
figure.miss { border-color: #c62828; }
ul { list-style: none; padding: 0; margin: 0.2em 0; }
li.hit { color: #1b6e27; }
li.miss { color: #b71c1c; }
h3 { font-size: 0.95em; margin: 0 0 0.3em; }
pre { background: #f7f7f7; padding: 0.6em; }
"""


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def _img(data: bytes | np.ndarray | None, alt: str) -> str:
    if data is None:
        return ""
    if isinstance(data, np.ndarray):
        data = encode_png(data)
    encoded = base64.b64encode(bytes(data)).decode("ascii")
    return f'<img src="data:image/png;base64,{encoded}" alt="{html.escape(alt)}">'


def _attributes(attributes: Mapping[str, Any], asked: Mapping[str, Any] | None) -> tuple[str, bool]:
    """A list of `group: value` lines, asked groups marked hit/miss; and whether all asked hit."""
    items, all_hit = [], True
    asked = asked or {}
    for group, value in attributes.items():
        line = f"{html.escape(str(group))}: {html.escape(_text(value))}"
        if group in asked:
            hit = has_value(value, asked[group])
            all_hit &= hit
            mark = "&#10003; hit" if hit else "&#10007; miss"
            items.append(f'<li class="{"hit" if hit else "miss"}">{line} <b>{mark}</b></li>')
        else:
            items.append(f"<li>{line}</li>")
    missing = [g for g in asked if g not in attributes]
    for group in missing:  # an asked group the product lacks is a miss
        all_hit = False
        items.append(f'<li class="miss">{html.escape(str(group))}: (none) <b>&#10007; miss</b></li>')
    return "<ul>" + "".join(items) + "</ul>", all_hit


def _table(table: Any) -> str:
    if isinstance(table, Mapping):
        title = table.get("title", "")
        if "markdown" in table:
            return f"<h2>{html.escape(str(title))}</h2><pre>{html.escape(str(table['markdown']))}</pre>"
        header, rows = table.get("header", []), table.get("rows", [])
    else:
        title, header, rows = table
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<h2>{html.escape(str(title))}</h2><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _condition(entry: Mapping[str, Any]) -> str:
    asked = entry.get("condition", {})
    parts = ['<div class="condition">']
    asked_list, _ = _attributes(asked, None)
    parts.append(f'<div class="asked"><h3>asked</h3>{asked_list}</div>')
    parts.append(f'<div class="samples"><h3>generated</h3>{_img(entry.get("samples_png"), "generated samples")}</div>')
    judged = entry.get("judged")
    if judged is not None:
        judged_list, _ = _attributes(judged, asked)
        parts.append(f'<div class="judged"><h3>judged</h3>{judged_list}</div>')
    figures = []
    for rank, product in enumerate(entry.get("retrieved", []), 1):
        listing, hit = _attributes(product.get("attributes", {}), asked)
        label = html.escape(str(product.get("id", "")))
        figures.append(f'<figure class="{"hit" if hit else "miss"}">{_img(product.get("png"), f"product {label}")}'
                       f"<figcaption>#{rank} {label} <b>{'hit' if hit else 'miss'}</b>{listing}</figcaption></figure>")
    parts.append(f'<div class="retrieved"><h3>retrieved</h3><div class="products">{"".join(figures)}</div></div>')
    parts.append("</div>")
    return "".join(parts)


def render_html(report: Mapping[str, Any], visuals: Mapping[str, Mapping[str, Any]]) -> str:
    title = str(report.get("title", "Retrieval evaluation"))
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    settings = report.get("settings") or {}
    if settings:
        rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_text(v))}</td></tr>"
                       for k, v in settings.items())
        parts.append(f'<table class="settings">{rows}</table>')
    parts += [_table(t) for t in report.get("tables") or []]
    for model, visual in visuals.items():
        parts.append(f'<section class="model"><h2>model: {html.escape(str(model))}</h2>')
        grid = visual.get("grid_png")
        if grid is not None:
            parts.append(f'<div class="grid">{_img(grid, f"sample grid of {model}")}</div>')
        parts += [_condition(entry) for entry in visual.get("conditions", [])]
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_html(report: Mapping[str, Any], visuals: Mapping[str, Mapping[str, Any]], out: Path) -> Path:
    """Write the page to `out` atomically (a temporary file beside it, then os.replace)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    page = render_html(report, visuals)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(page)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is for reading
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out

