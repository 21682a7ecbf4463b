"""Sphinx extension: author-year labels in the bibliography.

The text cites author-year (``bibtex_reference_style: author_year``: "Federici et al. (2026)"),
so the reference list carries the same labels ("[Federici et al., 2026]") instead of numbers,
sorted by author and year. Registered as the pybtex formatting style ``authoryear``
(``bibtex_default_style: authoryear`` in book/_config.yml).
"""

from __future__ import annotations

import codecs
import string

import latexcodec  # noqa: F401  (registers the "ulatex" codec)
from pybtex.plugin import register_plugin
from pybtex.style.formatting.unsrt import Style as UnsrtStyle
from pybtex.style.labels import BaseLabelStyle
from pybtex.style.sorting.author_year_title import SortingStyle


def _last_name(person) -> str:
    raw = " ".join(person.prelast_names + person.last_names)
    return codecs.decode(raw, "ulatex").replace("{", "").replace("}", "")


def author_year_label(entry) -> str:
    """``Haar, 1910``; ``Rehurek and Sojka, 2010``; ``Federici et al., 2026`` (three or more
    authors, or a list that ends with ``and others``)."""
    persons = entry.persons.get("author") or entry.persons.get("editor") or []
    names = [_last_name(p) for p in persons]
    others = "others" in names
    names = [n for n in names if n != "others"]
    if len(names) >= 3 or (others and names):
        who = f"{names[0]} et al."
    elif len(names) == 2:
        who = f"{names[0]} and {names[1]}"
    elif names:
        who = names[0]
    else:
        who = entry.key
    return f"{who}, {entry.fields.get('year', 'n.d.')}"


class AuthorYearLabelStyle(BaseLabelStyle):
    def format_labels(self, sorted_entries):
        labels = [author_year_label(e) for e in sorted_entries]
        for label in set(labels):  # the same authors and year twice: 2026a, 2026b
            idx = [i for i, x in enumerate(labels) if x == label]
            if len(idx) > 1:
                for i, letter in zip(idx, string.ascii_lowercase):
                    labels[i] = label + letter
        yield from labels


class AuthorYearStyle(UnsrtStyle):
    default_label_style = AuthorYearLabelStyle
    default_sorting_style = SortingStyle


def setup(app):
    register_plugin("pybtex.style.formatting", "authoryear", AuthorYearStyle)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
