"""Check that a built HTML book is legible at the column width (run after the book build).

Usage: python .ci/check_legible.py _build/html

Fails (exit 1, one line per offence) when a page of the book has
* a line of text output (a cell's printed or plain-text output) longer than
  ``stamp_lib.book.plotting.TEXT_COLS`` characters: it would be cut off or scroll in the column;
* a figure not drawn by ``stamp_lib.book.plotting.show`` (no ``stamp:min_font_pt`` in the PNG), or
  one whose smallest text is displayed under ``plotting.MIN_PT`` points, computed from that font
  size, the PNG's resolution (its pHYs chunk) and the width the page gives it, capped at
  ``plotting.COLUMN_PX``;
* a table whose estimated smallest width (longest word per column, see
  ``plotting.table_width_px``) exceeds the column.

Pages of Sphinx itself (search, genindex) are skipped.
"""

from __future__ import annotations

import re
import struct
import sys
import zlib
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from stamp_lib.book import plotting

sys.path.pop(0)
SKIP = {"search.html", "genindex.html", "py-modindex.html"}


def png_info(data: bytes) -> dict:
    """``width``, ``dpi`` (from pHYs, None if absent) and the tEXt/iTXt/zTXt entries of a PNG."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    info = {"width": struct.unpack(">I", data[16:20])[0], "dpi": None, "text": {}}
    pos = 8
    while pos + 8 <= len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"pHYs" and body[8] == 1:  # unit: metre
            info["dpi"] = struct.unpack(">I", body[:4])[0] * 0.0254
        elif kind == b"tEXt":
            k, _, v = body.partition(b"\0")
            info["text"][k.decode("latin-1")] = v.decode("latin-1")
        elif kind == b"zTXt":
            k, _, v = body.partition(b"\0")
            info["text"][k.decode("latin-1")] = zlib.decompress(v[1:]).decode("latin-1")
        elif kind == b"iTXt":
            k, _, rest = body.partition(b"\0")
            flag, rest = rest[0], rest[2:]
            _, _, rest = rest.partition(b"\0")
            _, _, v = rest.partition(b"\0")
            info["text"][k.decode("latin-1")] = (zlib.decompress(v) if flag else v).decode("utf-8")
        pos += 12 + n
    return info


class _Page(HTMLParser):
    """Collects text outputs, output images and tables of one page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, set]] = []
        self.pre: list[str] = []
        self.pres: list[str] = []
        self.images: list[dict] = []
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None

    def _in(self, cls: str) -> bool:
        return any(cls in c for _, c in self.stack)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        if tag not in ("img", "br", "hr", "meta", "link", "input", "col"):
            self.stack.append((tag, classes))
        if tag == "pre" and self._in("cell_output"):
            self.pre = []
        elif tag == "img" and self._in("cell_output"):
            style = a.get("style") or ""
            m = re.search(r"width:\s*([\d.]+)px", style)
            width = float(m.group(1)) if m else (float(a["width"]) if a.get("width", "").isdigit() else None)
            self.images.append({"src": a.get("src", ""), "width": width})
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th") and self.tables:
            self._cell = []

    def handle_endtag(self, tag):
        while self.stack:
            t, _ = self.stack.pop()
            if t == tag:
                break
        if tag == "pre" and self._in("cell_output"):
            self.pres.append("".join(self.pre))
            self.pre = []
        elif tag in ("td", "th") and self._cell is not None and self.tables and self.tables[-1]:
            self.tables[-1][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if self.stack and self.stack[-1][0] in ("pre", "span") and self._in("cell_output"):
            self.pre.append(data)
        elif self._in("cell_output") and any(t == "pre" for t, _ in self.stack):
            self.pre.append(data)
        if self._cell is not None:
            self._cell.append(data)


def check_page(page: Path) -> list[str]:
    """Every offence of one HTML page, as ``page: what`` lines."""
    p = _Page()
    p.feed(page.read_text(errors="replace"))
    bad = []
    for text in p.pres:
        for line in unescape(text).splitlines():
            if plotting.machine_paths(line):
                bad.append(f"text output shows a path of the machine that built it: {line.strip()[:60]!r}")
            if len(line.rstrip()) > plotting.TEXT_COLS:
                bad.append(f"text output line of {len(line.rstrip())} > {plotting.TEXT_COLS} characters: "
                           f"{line.strip()[:60]!r}...")
    for img in p.images:
        src = img["src"]
        if not src.lower().endswith(".png"):
            continue
        path = (page.parent / src).resolve()
        try:
            info = png_info(path.read_bytes())
        except (OSError, ValueError) as exc:
            bad.append(f"figure {src}: unreadable ({exc})")
            continue
        font = info["text"].get("stamp:min_font_pt")
        if font is None:
            bad.append(f"figure {src}: not drawn with stamp_lib.book.plotting.show (no stamp:min_font_pt)")
            continue
        dpi = info["dpi"] or plotting.RENDER_DPI
        shown = plotting.displayed_pt(float(font), info["width"], dpi, img["width"])
        if shown < plotting.MIN_PT - 0.05:
            bad.append(f"figure {src}: smallest text displayed at {shown:.1f} pt < {plotting.MIN_PT:g} pt")
    for rows in p.tables:
        rows = [r for r in rows if r]
        if not rows:
            continue
        ncol = max(len(r) for r in rows)
        rows = [r + [""] * (ncol - len(r)) for r in rows]
        w = plotting.table_width_px(rows[0], rows[1:])
        if w > plotting.COLUMN_PX:
            bad.append(f"table ({rows[0][:3]}...) needs about {w:.0f} px > {plotting.COLUMN_PX} px column")
    return [f"{page.name}: {b}" for b in bad]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    root = Path(argv[0])
    pages = [p for p in sorted(root.rglob("*.html")) if p.name not in SKIP and "_static" not in p.parts]
    if not pages:
        print(f"check_legible: no HTML pages under {root} (build the book first)", file=sys.stderr)
        return 2
    bad = [b for page in pages for b in check_page(page)]
    for line in bad:
        print(f"check_legible: {line}", file=sys.stderr)
    print(f"check_legible: {len(pages)} pages, {len(bad)} offences")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
