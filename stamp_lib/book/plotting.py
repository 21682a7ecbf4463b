"""One plotting and table style for the whole book: every chapter draws through this module.

Conventions (chapters 1-4 follow them; ``.ci/check_legible.py`` and ``tests/test_notebooks.py``
check them on the built book and on every executed notebook)
---------------------------------------------------------------------------------------------
* **The column.** The book's text column is :data:`COLUMN_PX` CSS px wide (sphinx-book-theme,
  1280-px window). ``fig, axes = plotting.figure(nrows, ncols, height=...)`` makes a figure
  :data:`WIDTH_IN` inches wide, shown at :data:`DISPLAY_DPI` CSS px per inch, i.e. narrower than
  the column, so the browser never shrinks it. Fonts are 8-10 pt (:data:`RC`, applied on import).
* **Show with** ``plotting.show(fig)``, **never** ``plt.show()``. It measures the smallest text of
  the figure *as it will be displayed* (font size x the scale at which the column shows the
  image) and raises :class:`FigureTooSmall`, naming the text, when it is under :data:`MIN_PT`
  (8 pt). It renders the PNG at :data:`RENDER_DPI` (twice the display resolution, sharp on dense
  screens), writes the smallest font size into the PNG (``stamp:min_font_pt``, read by the build
  check), displays it at its display width and closes the figure.
* **Split, don't shrink.** At most :data:`MAX_COLS` panels side by side (2 for maps); more panels
  go into more rows or another figure.
* **One colour per name, book-wide.** ``plotting.color("dct")``; ``plotting.style("klt (in-sample)")``
  gives colour *and* line style (the ideal, unreachable references are dashed). Names are
  transforms, methods (ch. 3/4) and bit policies; case does not matter. An unknown name is an
  error: register it once in :data:`COLORS` (and :data:`DASHED`) below, never pick colours in a
  notebook. Bit policies also have markers (:data:`MARKERS`).
* **One display name per key, book-wide.** ``plotting.label("smoothquant")`` -> ``SmoothQuant``,
  ``plotting.label("dwt", "transform")`` -> ``Haar DWT``: legends, table rows and glued prose
  use :func:`label`, never a raw key (:data:`LABELS`; an unknown key is an error).
* **Maps get a colour bar** with a label (:func:`heatmap`).
* **Legends where the eye needs them**: on the panel, or one legend under all panels
  (:func:`figure_legend`) when the panels share their series.
* **Tables**: ``plotting.table(header, rows)`` returns Markdown that the book renders as a themed
  table (and JupyterLab as a table too); one quantity per cell, numbers formatted by the caller
  (:func:`num`), at most :data:`MAX_TABLE_COLS` columns and an estimated minimum width within the
  column, else :class:`ValueError` ("split the table"). Show it with ``display(...)`` in a cell
  tagged ``remove-input`` or ``hide-input``.
* **Text output**: printed lines stay within :data:`TEXT_COLS` characters (the width of the column
  in the output font); longer listings become tables.
"""

from __future__ import annotations

import io
import math
import re
import struct
from pathlib import Path
from typing import Iterable, Sequence

import matplotlib
import matplotlib.pyplot as plt
from cycler import cycler
from matplotlib.text import Text

# ---- the column ------------------------------------------------------------------------------

COLUMN_PX = 676        # CSS px of the text column (sphinx-book-theme 1.3, window 1280 px wide)
DISPLAY_DPI = 100      # CSS px per figure inch as displayed (the image's width attribute)
RENDER_DPI = 200       # pixels per inch of the PNG (2x: sharp on high-density screens)
WIDTH_IN = 6.5         # figure width: 650 CSS px, inside the column, never scaled down
MIN_PT = 8.0           # smallest text as displayed, in CSS points (1 pt = 4/3 CSS px)
MAX_COLS = 3           # panels side by side at the column width (2 for maps with colour bars)
TEXT_COLS = 76         # characters of a printed line that fit the column (14-px monospace, 8.4 px each)
MAX_TABLE_COLS = 7     # columns of a table at the column width
TABLE_CHAR_PX = 7.5    # estimated width of one character of table text (CSS px)
TABLE_PAD_PX = 17      # estimated padding + border of one table cell (CSS px)

PT_PER_CSS_PX = 0.75


class FigureTooSmall(ValueError):
    """A figure whose smallest text would be displayed under :data:`MIN_PT`."""


# ---- the style -------------------------------------------------------------------------------

RC = {
    "figure.dpi": DISPLAY_DPI,
    "savefig.dpi": RENDER_DPI,
    "figure.figsize": (WIDTH_IN, 3.6),
    "figure.constrained_layout.use": True,
    "figure.facecolor": "white",
    "font.size": 9.0,
    "axes.titlesize": 9.5,
    "axes.labelsize": 9.0,
    "xtick.labelsize": 8.5,
    "ytick.labelsize": 8.5,
    "legend.fontsize": 8.5,
    "legend.title_fontsize": 8.5,
    "figure.titlesize": 10.0,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "lines.linewidth": 1.6,
    "lines.markersize": 5.0,
    "legend.frameon": False,
    "image.interpolation": "nearest",
}

# Okabe-Ito (colour-blind safe) for transforms, Paul Tol "bright"/"muted" for methods.
COLORS = {
    # sequence transforms (chapters 1, 2, 4)
    "identity": "#7f7f7f",
    "dct": "#0072B2",
    "wht": "#E69F00",
    "dwt": "#009E73",
    "dwt2d": "#CC79A7",
    "klt": "#D55E00",
    "klt (analytic)": "#000000",
    "klt (in-sample)": "#000000",
    "diff": "#882255",
    "dct (token 0 apart)": "#56B4E9",
    "dwt (token 0 apart)": "#7BC8A4",
    "mean": "#999933",
    "static": "#661100",
    "running": "#44AA99",
    # bit policies (chapter 1)
    "uniform": "#7f7f7f",
    "two-level": "#332288",
    "optimal": "#AA3377",
    # methods (chapters 3, 4): baselines and feature transforms, with or without STaMP
    "fp": "#000000",
    "rtn": "#4477AA",
    "smoothquant": "#66CCEE",
    "quarot": "#228833",
    "flatquant": "#CCBB44",
    "svdquant": "#EE6677",
    "viditq": "#AA3377",
    "hadamard": "#BBBBBB",
    "stamp": "#D55E00",
    "hadamard + stamp": "#882255",
}
DASHED = {"klt (analytic)", "klt (in-sample)", "dct (token 0 apart)", "dwt (token 0 apart)"}
MARKERS = {"uniform": "o", "two-level": "s", "optimal": "^"}

RC["axes.prop_cycle"] = cycler(color=["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7",
                                      "#56B4E9", "#7f7f7f", "#000000"])
matplotlib.rcParams.update(RC)


def _key(name: str) -> str:
    return " ".join(str(name).strip().lower().split())


def color(name: str) -> str:
    """The book-wide colour of a transform, method or bit policy (case-insensitive).

    Raises ``KeyError`` naming the known names for an unknown one: register new names in
    :data:`COLORS`, so that a name has the same colour in every chapter.
    """
    k = _key(name)
    if k not in COLORS:
        raise KeyError(f"no colour registered for {name!r}; known: {sorted(COLORS)}. "
                       "Add it to stamp_lib.book.plotting.COLORS (one colour per name, book-wide).")
    return COLORS[k]


def style(name: str) -> dict:
    """``color`` and ``ls`` (solid, or dashed for the references in :data:`DASHED`) of a name."""
    return {"color": color(name), "ls": "--" if _key(name) in DASHED else "-"}


# ---- display names ---------------------------------------------------------------------------

# One display name per key, book-wide, for legends, table rows and the prose (glue the label).
# Three kinds, because a key can name a transform in chapters 1-2 and a STaMP column in 3-4.
LABELS: dict[str, dict[str, str]] = {
    "method": {   # baselines, weight quantizers and the STaMP columns of chapters 3 and 4
        "fp": "FP",
        "rtn": "RTN",
        "gptq": "GPTQ",
        "smoothquant": "SmoothQuant",
        "quarot": "QuaRot",
        "flatquant": "FlatQuant",
        "svdquant": "SVDQuant-style",
        "viditq": "ViDiT-Q",
        "hadamard": "Hadamard (per linear)",
        "none": "bit-matched",
        "uniform": "uniform A4",
        "stamp": "STaMP",
        "dwt": "STaMP (DWT)",
        "dct": "STaMP (DCT)",
        "hadamard + stamp": "Hadamard + STaMP",
        "mean": "mean token only",
        "static": "static offset",
        "running": "running mean",
    },
    "transform": {   # sequence transforms (chapters 1, 2, 4)
        "identity": "identity",
        "dct": "DCT",
        "wht": "WHT",
        "dwt": "Haar DWT",
        "dwt2d": "2-D Haar DWT",
        "klt": "KLT (calibrated)",
        "klt (analytic)": "KLT (analytic)",
        "klt (in-sample)": "KLT (in-sample)",
        "diff": "difference (DPCM)",
        "dct (token 0 apart)": "DCT, token 0 apart",
        "dwt (token 0 apart)": "Haar DWT, token 0 apart",
        "mean": "mean token only",
        "static": "static offset",
        "running": "running mean",
    },
    "policy": {   # bit policies (chapter 1)
        "uniform": "uniform bits",
        "two-level": "two-level (64x8+4)",
        "optimal": "log-energy (optimal)",
    },
}


# Shorter forms for table headers and tick labels, where the column is tight (else the label).
SHORT_LABELS: dict[str, dict[str, str]] = {
    "method": {"hadamard": "Hadamard", "svdquant": "SVDQuant", "dwt": "+ DWT", "dct": "+ DCT"},
    "transform": {"dwt": "DWT", "dwt2d": "2-D DWT", "klt": "KLT", "klt (in-sample)": "in-sample KLT",
                  "klt (analytic)": "analytic KLT", "diff": "difference"},
    "policy": {"uniform": "uniform", "two-level": "two-level", "optimal": "optimal"},
}


def label(key, kind: str = "method", short: bool = False) -> str:
    """The display name of a method, transform or bit policy key (case-insensitive), from
    :data:`LABELS`; ``kind`` is ``"method"`` (default), ``"transform"`` or ``"policy"``. A tuple
    key (method, weight quantizer) gives ``"QuaRot, GPTQ"``. ``KeyError`` naming the known keys
    for an unknown one: register it in :data:`LABELS`, never spell a label in a notebook.
    ``short=True``: the form of :data:`SHORT_LABELS` for table headers and ticks, if it has one."""
    if kind not in LABELS:
        raise KeyError(f"label kind must be one of {sorted(LABELS)}, got {kind!r}")
    if isinstance(key, tuple):
        return ", ".join(label(k, kind, short) for k in key)
    k = _key(key)
    if k not in LABELS[kind]:
        raise KeyError(f"no {kind} label registered for {key!r}; known: {sorted(LABELS[kind])}. "
                       "Add it to stamp_lib.book.plotting.LABELS (one display name per key, book-wide).")
    return SHORT_LABELS[kind].get(k, LABELS[kind][k]) if short else LABELS[kind][k]


def marker(policy: str) -> str:
    """The marker of a bit policy (:data:`MARKERS`); ``KeyError`` for an unknown policy."""
    k = _key(policy)
    if k not in MARKERS:
        raise KeyError(f"no marker registered for {policy!r}; known: {sorted(MARKERS)}")
    return MARKERS[k]


# ---- figures ---------------------------------------------------------------------------------

def figure(nrows: int = 1, ncols: int = 1, *, height: float | None = None, maps: bool = False,
           **subplots_kw):
    """``(fig, axes)`` at the column width, as ``plt.subplots`` (``axes`` squeezed likewise).

    ``height`` in inches (default 3.6 for one row, 2.7 per row otherwise). ``ncols`` above
    :data:`MAX_COLS` (above 2 with ``maps=True``) is a ``ValueError``: split the figure.
    """
    limit = 2 if maps else MAX_COLS
    if ncols > limit:
        raise ValueError(f"{ncols} panels side by side do not fit the column legibly (at most "
                         f"{limit}{' maps' if maps else ''}): use more rows or another figure")
    if height is None:
        height = 3.6 if nrows == 1 else 2.7 * nrows
    return plt.subplots(nrows, ncols, figsize=(WIDTH_IN, height), **subplots_kw)


def texts(fig) -> list[Text]:
    """Every visible, non-empty text artist of ``fig`` (titles, labels, ticks, legends, colour bars)."""
    out = []
    for t in fig.findobj(Text):
        if t.get_visible() and t.get_text().strip() and (t.axes is None or t.axes.get_visible()):
            out.append(t)
    return out


def min_font(fig) -> tuple[float, str]:
    """The smallest font size (pt) of :func:`texts` and that text (``inf, ''`` for none)."""
    best, what = math.inf, ""
    for t in texts(fig):
        if t.get_fontsize() < best:
            best, what = float(t.get_fontsize()), t.get_text()
    return best, what


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) in pixels of PNG bytes (from the IHDR chunk)."""
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    return struct.unpack(">II", png[16:24])


def displayed_pt(font_pt: float, png_width: int, render_dpi: float = RENDER_DPI,
                 width_px: float | None = None) -> float:
    """Size in CSS pt at which a ``font_pt`` text of a PNG is displayed in the column.

    The PNG is ``png_width`` pixels wide at ``render_dpi``; the page gives it ``width_px`` CSS px
    (default: its natural width at :data:`DISPLAY_DPI`), and the column caps it at
    :data:`COLUMN_PX`.
    """
    if width_px is None:
        width_px = png_width * DISPLAY_DPI / render_dpi
    shown = min(width_px, COLUMN_PX)
    css_px = font_pt * render_dpi / 72 * (shown / png_width)   # the text's height on screen
    return css_px * PT_PER_CSS_PX


def render(fig) -> tuple[bytes, int, float]:
    """PNG bytes of ``fig`` (at :data:`RENDER_DPI`, tight), its display width in CSS px, and the
    smallest text as displayed (CSS pt). Raises :class:`FigureTooSmall` below :data:`MIN_PT`."""
    font, what = min_font(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=RENDER_DPI, bbox_inches="tight", pad_inches=0.05,
                metadata={"Software": "stamp_lib.book.plotting", "stamp:min_font_pt": f"{font:.3f}"})
    png = buf.getvalue()
    w, _ = png_size(png)
    width_px = round(w * DISPLAY_DPI / RENDER_DPI)
    shown = displayed_pt(font, w) if math.isfinite(font) else math.inf
    if shown < MIN_PT - 1e-6:
        raise FigureTooSmall(
            f"text {what!r} ({font:g} pt) would be displayed at {shown:.1f} pt < {MIN_PT:g} pt: the "
            f"figure is {width_px} px wide for a {COLUMN_PX}-px column. Use plotting.figure() and "
            "fonts of at least 8 pt, and split the figure rather than shrink it")
    return png, width_px, shown


def show(fig, *, alt: str | None = None) -> None:
    """Check, render and display ``fig`` (see the module docstring), then close it.

    In a notebook the image is displayed at its natural width (never above the column); outside
    IPython nothing is displayed. Raises :class:`FigureTooSmall` (after closing the figure).
    """
    try:
        png, width_px, _ = render(fig)
    finally:
        plt.close(fig)
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:  # pragma: no cover - IPython is part of the book environment
        return
    if get_ipython() is not None:
        display(Image(data=png, format="png", width=width_px, alt=alt))


def heatmap(ax, A, *, label: str, cmap: str = "RdBu_r", vmin=None, vmax=None, title: str | None = None):
    """``imshow`` of matrix ``A`` without ticks and with a labelled colour bar; returns the image."""
    im = ax.imshow(A, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    if title:
        ax.set_title(title)
    ax.figure.colorbar(im, ax=ax, shrink=0.85, label=label)
    return im


def figure_legend(fig, handles=None, labels=None, *, ncols: int | None = None, **kw):
    """One legend for all panels, under them (constrained layout keeps it inside the figure)."""
    if handles is None:
        seen = {}
        for ax in fig.axes:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                seen.setdefault(lab, h)
        labels, handles = list(seen), list(seen.values())
    n = len(handles)
    return fig.legend(handles, labels, loc="outside lower center", ncols=ncols or min(n, 4), **kw)


# ---- tables ----------------------------------------------------------------------------------

_NUMERIC = re.compile(r"^[\s$]*[-+\u2212]?(\d[\d,]*\.?\d*|\.\d+)(e[-+]?\d+)?\s*(%|x|dB)?[\s$]*$", re.I)


def num(v, digits: int = 3) -> str:
    """A number for a table or the prose: ``digits`` significant digits (whole numbers without
    decimals), no exponent, thousands separated; ``n/a`` for None or NaN."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    v = float(v)
    if v == 0:
        return "0"
    if v.is_integer() and abs(v) < 1e6:   # counts: no decimals
        return f"{int(v):,}"
    mag = math.floor(math.log10(abs(v)))
    if mag >= digits - 1:
        return f"{v:,.0f}"
    return f"{v:.{max(0, digits - 1 - mag)}f}"


def table_width_px(header: Sequence[str], rows: Sequence[Sequence]) -> float:
    """Estimated smallest width (CSS px) of a table whose cells wrap at spaces: per column, its
    longest word; :data:`TABLE_CHAR_PX` per character, :data:`TABLE_PAD_PX` per cell."""
    cols = list(zip(*([list(header)] + [list(r) for r in rows])))
    width = 0.0
    for col in cols:
        words = [w for c in col for w in _plain(str(c)).split()] or [""]
        width += max(len(w) for w in words) * TABLE_CHAR_PX + TABLE_PAD_PX
    return width


def _plain(s: str) -> str:
    """Text of a Markdown cell as displayed, roughly (markup and maths delimiters removed)."""
    s = re.sub(r"\{[a-z:]+\}`([^`]*)`", r"\1", s)       # roles
    s = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", s)        # links
    return re.sub(r"[*_`$\\]", "", s)


def table(header: Sequence[str], rows: Iterable[Sequence], *, align: str | None = None,
          title: str | None = None):
    """A Markdown table (``IPython.display.Markdown``) that fits the column.

    ``rows`` hold strings (format numbers with :func:`num`) or numbers (formatted with
    :func:`num`); one quantity per cell. ``align``: one of ``l``/``r``/``c`` per column (default:
    right for columns whose cells are all numbers, left otherwise). ``title``: a bold line above
    the table saying what its cells are (Markdown). Raises ``ValueError`` for a row of the wrong
    length, more than :data:`MAX_TABLE_COLS` columns, or an estimated width above
    :data:`COLUMN_PX` (split the table).
    """
    from IPython.display import Markdown

    header = [str(h) for h in header]
    rows = [[c if isinstance(c, str) else num(c) for c in r] for r in rows]
    n = len(header)
    for r in rows:
        if len(r) != n:
            raise ValueError(f"table row {r!r} has {len(r)} cells, the header {n}")
    if n > MAX_TABLE_COLS:
        raise ValueError(f"{n} columns do not fit the column (at most {MAX_TABLE_COLS}): split the table")
    w = table_width_px(header, rows)
    if w > COLUMN_PX:
        raise ValueError(f"table needs about {w:.0f} px, the column has {COLUMN_PX}: split the table "
                         "or shorten its longest words")
    if align is None:
        align = "".join("r" if rows and all(_NUMERIC.match(r[j]) or r[j] in ("n/a", "-", "")
                                            for r in rows) else "l" for j in range(n))
    if len(align) != n or set(align) - set("lrc"):
        raise ValueError(f"align must be {n} letters of l/r/c, got {align!r}")
    rule = {"l": ":--", "r": "--:", "c": ":-:"}

    def esc(c: str) -> str:
        return c.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(esc(h) for h in header) + " |",
             "|" + "|".join(rule[a] for a in align) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    if title:
        lines = [f"**{title}**", ""] + lines
    return Markdown("\n".join(lines))


def check_lines(text: str, limit: int = TEXT_COLS) -> list[str]:
    """The lines of ``text`` longer than ``limit`` characters (empty list: it fits the column)."""
    return [ln for ln in text.splitlines() if len(ln.rstrip()) > limit]


def machine_paths(text: str) -> list[str]:
    """The lines of an output ``text`` that show a path of the machine that ran it (the
    repository's absolute path, or a cell's value such as ``PosixPath('/home/...')``)."""
    root = str(Path(__file__).resolve().parents[1])
    return [ln for ln in text.splitlines() if root in ln or "PosixPath(" in ln]
