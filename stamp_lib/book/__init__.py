"""Book plumbing: nothing here computes a reported number. Imports :mod:`stamp_lib.core.io`.

* :mod:`.study`: the size switch, one run of a notebook (numbers with their knobs, glued text,
  checked sentences, verdicts), provenance and full-size records.
* :mod:`.claims`: the claims registry and how verdicts are written.
* :mod:`.plotting`: one figure style, legible at the column width; tables; page checks.
"""
