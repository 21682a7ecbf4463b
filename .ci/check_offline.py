"""Check that a built HTML book loads nothing from the network.

Usage: python .ci/check_offline.py _build/html

Fails (exit 1, one line per offence) if any page has a ``src=`` (script, img, iframe, ...) or a
``<link href=...>`` (stylesheet, font preload, icon) pointing at another host (``http://``,
``https://`` or ``//``), or if any CSS file under the folder imports or references a remote URL.
Plain ``<a href>`` links are allowed: they load nothing until clicked.
"""

from __future__ import annotations

import re
import sys
from html.parser import HTMLParser
from pathlib import Path

REMOTE = re.compile(r"^\s*(https?:)?//", re.I)
CSS_REMOTE = re.compile(r"(?:url\(\s*['\"]?|@import\s+['\"])\s*((?:https?:)?//[^'\")\s]+)", re.I)


class _Loads(HTMLParser):
    """Collects (tag, url) for every attribute that makes the browser fetch something."""

    def __init__(self) -> None:
        super().__init__()
        self.remote: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        urls = [a.get("src")]
        if tag == "link":
            urls.append(a.get("href"))
        if tag in ("object",):
            urls.append(a.get("data"))
        for u in urls:
            if u and REMOTE.match(u):
                self.remote.append((tag, u))


def remote_loads(root: Path) -> list[str]:
    """Every remote load under ``root`` as ``file: <tag> url`` lines (empty list = offline)."""
    bad = []
    for page in sorted(root.rglob("*.html")):
        p = _Loads()
        p.feed(page.read_text(errors="replace"))
        bad += [f"{page.relative_to(root)}: <{tag}> {url}" for tag, url in p.remote]
    for css in sorted(root.rglob("*.css")):
        for url in CSS_REMOTE.findall(css.read_text(errors="replace")):
            bad.append(f"{css.relative_to(root)}: css {url}")
    return bad


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    root = Path(argv[0])
    if not root.is_dir() or not any(root.rglob("*.html")):
        print(f"check_offline: no HTML pages under {root} (build the book first)", file=sys.stderr)
        return 2
    bad = remote_loads(root)
    for line in bad:
        print(f"check_offline: remote load: {line}", file=sys.stderr)
    n = sum(1 for _ in root.rglob("*.html"))
    print(f"check_offline: {n} pages, {len(bad)} remote loads")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
