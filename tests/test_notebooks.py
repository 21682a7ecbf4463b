"""Every notebook of the book executed as a test, and proofs that the pipeline catches failures.

* ``test_notebook[<stem>]``: one test per ``notebooks/*.md`` (MyST markdown, read with jupytext),
  executed top to bottom by nbclient with this venv's ``python3`` kernel, cwd ``notebooks/`` (as
  in the book build), STUDY_SIZE from the environment (``small`` by default, see conftest.py).
  Sorted by name, so ``99_claims`` runs after the chapters whose results it summarises. A failing
  cell fails the test with the notebook, the cell number, its source and the error.
  Its outputs must fit the book's column: printed lines of at most ``plotting.TEXT_COLS``
  characters, and every figure drawn by ``plotting.show`` (which refuses illegible ones).
* ``test_notebook_source_conventions``: static checks of every notebook (no code cell longer
  than a screen, visible code lines within the column, no "(printed above)" in the prose, no
  ``plt.show()``). A ``{glue:text}`` name that is never glued fails the book build (-W).
* ``test_executor_*`` and ``test_book_build_*`` run a throwaway notebook with a deliberately
  raising cell (in ``tmp_path``, never in the book) and check that the executor and a tiny book
  built with the real ``book/_config.yml`` both fail on it, while a sound notebook next to it
  passes, renders, and loads nothing from the network.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jupytext
import pytest
import yaml
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

from stamp_lib.book import claims

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.md"))  # 99_claims last
CELL_TIMEOUT = 1800  # seconds per cell, as execute.timeout in book/_config.yml
MAX_CELL_LINES = 30  # a code cell fits on a screen
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
HIDDEN = {"hide-input", "remove-input", "remove-cell", "hide-cell"}


_GLUE_REF = re.compile(r"\{glue(?::[a-z]+)?\}`([^`<]+?)(?:\s*<[^`]*>)?`")


def missing_glue(nb) -> list[str]:
    """Keys that the prose of an executed notebook cites (``{glue:text}`key```, ``{glue}``,
    ``{glue:figure}``, ...) but that no cell glued: the book build fails on them."""
    cited = {m.group(1).strip() for c in nb.cells if c.cell_type == "markdown"
             for m in _GLUE_REF.finditer(c.source)}
    glued = {o.get("metadata", {}).get("scrapbook", {}).get("name") for c in nb.cells
             if c.cell_type == "code" for o in c.get("outputs", [])}
    return sorted(cited - glued)


def test_missing_glue_finds_an_unglued_key():
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("x is {glue:text}`x`, y is {glue}`y`, z {glue:figure}`z`"),
        nbformat.v4.new_code_cell(outputs=[nbformat.v4.new_output(
            "display_data", data={"text/plain": "1"}, metadata={"scrapbook": {"name": "x"}})])])
    assert missing_glue(nb) == ["y", "z"]


def test_output_offences_finds_a_local_path():
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(outputs=[nbformat.v4.new_output(
        "execute_result", data={"text/plain": f"PosixPath('{ROOT}/data/results/x.json')"}, execution_count=1)])])
    bad = output_offences(nb)
    assert len(bad) == 1 and bad[0].startswith("code cell 1: an output shows a path of this machine")


def output_offences(nb) -> list[str]:
    """Outputs of an executed notebook that would not fit the book's column, or that show a
    path of the machine that ran it (a cell's value such as ``PosixPath('/home/...')``)."""
    import base64

    from stamp_lib.book import plotting

    bad = []
    for k, cell in enumerate([c for c in nb.cells if c.cell_type == "code"], 1):
        for o in cell.get("outputs", []):
            bad += [f"code cell {k}: an output shows a path of this machine: {ln.strip()[:60]!r}"
                    for ln in plotting.machine_paths(o.get("text", "") + o.get("data", {}).get("text/plain", ""))]
            if o.get("output_type") == "stream" and o.get("name") == "stdout":
                bad += [f"code cell {k}: printed line of {len(ln)} > {plotting.TEXT_COLS} characters: {ln[:50]!r}"
                        for ln in plotting.check_lines(_ANSI.sub("", o["text"]))]
            png = o.get("data", {}).get("image/png")
            if png and b"stamp:min_font_pt" not in base64.b64decode(png):
                bad.append(f"code cell {k}: a figure not drawn with stamp_lib.book.plotting.show")
    return bad


class NotebookFailed(AssertionError):
    """A notebook cell raised, timed out or killed the kernel."""


def execute(path: Path, cwd: Path | None = None, timeout: int = CELL_TIMEOUT):
    """Execute the MyST notebook ``path`` in a fresh kernel; return the executed notebook.

    Raises :class:`NotebookFailed` naming the notebook, the failing cell (1-based index among
    all cells), its source and the error with its traceback (colour codes removed).
    """
    nb = jupytext.read(path)
    kernel = nb.metadata.get("kernelspec", {}).get("name", "python3")
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name=kernel,
        resources={"metadata": {"path": str(cwd or path.parent)}},
    )
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as exc:
        code = [c for c in nb.cells if c.cell_type == "code"]
        failed = [
            (k, c) for k, c in enumerate(code, 1)
            if any(o.get("output_type") == "error" for o in c.get("outputs", []))
        ]
        where = ""
        if failed:
            k, cell = failed[-1]
            where = f"code cell {k} of {len(code)}:\n{cell.source}\n{'-' * 40}\n"
        raise NotebookFailed(
            f"{path.name}: {type(exc).__name__} in {where}{_ANSI.sub('', str(exc))}"
        ) from None
    return nb


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook(path: Path):
    try:
        nb = execute(path, cwd=ROOT / "notebooks")
    except NotebookFailed as exc:
        pytest.fail(str(exc), pytrace=False)
    bad = output_offences(nb)
    assert not bad, f"{path.name}: outputs wider than the book's column:\n" + "\n".join(bad)
    missing = missing_glue(nb)
    assert not missing, f"{path.name}: the prose cites glue keys no cell glued: {missing}"


# Chapters whose source does not follow the column conventions yet: listed here so that the gap
# is visible and strict (fixing the chapter makes the xfail fail, so the entry must be removed).
CONVENTIONS_TODO: dict[str, str] = {}


@pytest.mark.parametrize("path", [
    pytest.param(p, marks=pytest.mark.xfail(strict=True, reason=CONVENTIONS_TODO[p.stem]))
    if p.stem in CONVENTIONS_TODO else p for p in NOTEBOOKS], ids=[p.stem for p in NOTEBOOKS])
def test_notebook_source_conventions(path: Path):
    """Fast, no kernel: the conventions of stamp_lib/book/plotting.py and stamp_lib/book/study.py."""
    import jupytext

    from stamp_lib.book import plotting

    nb = jupytext.read(path)
    text = path.read_text()
    bad = []
    code = [c for c in nb.cells if c.cell_type == "code"]
    for k, cell in enumerate(code, 1):
        lines = cell.source.splitlines()
        if len(lines) > MAX_CELL_LINES:
            bad.append(f"code cell {k} has {len(lines)} lines (at most {MAX_CELL_LINES}: split it)")
        if not HIDDEN & set(cell.metadata.get("tags", [])):
            bad += [f"code cell {k}: visible line of {len(ln)} > {plotting.TEXT_COLS} characters: {ln.strip()[:40]!r}"
                    for ln in lines if len(ln) > plotting.TEXT_COLS]
        if "plt.show()" in cell.source:
            bad.append(f"code cell {k}: plt.show(); use plotting.show(fig)")
    if re.search(r"printed (above|below)", text):
        bad.append('the prose refers to "printed" output: glue the number instead')
    assert not bad, f"{path.name}:\n" + "\n".join(bad)


# ---------------------------------------------------------------------------------------------
# The pipeline catches failures: a throwaway raising notebook next to a sound one.

HEADER = """---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
    format_version: 0.13
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---
"""

GOOD = HEADER + r"""
# A sound page

Maths must render offline: $\hat X = L^{-1} Q(L X)$.

```{code-cell} ipython3
import os, sys
from tqdm.auto import tqdm

for _ in tqdm(range(3), desc="progress bar"):   # an ipywidgets progress bar
    pass
print("stderr-marker-" + "4410", file=sys.stderr)  # stderr: removed from the page, no warning
print("good-output-5821", os.environ["STUDY_SIZE"])
```
"""

BAD = HEADER + """
# A page with a failing cell

```{code-cell} ipython3
x = 1
```

```{code-cell} ipython3
raise RuntimeError("deliberate failure 7431")
```
"""


@pytest.mark.notebook
def test_executor_reports_a_failing_cell(tmp_path):
    (tmp_path / "good.md").write_text(GOOD)
    (tmp_path / "bad.md").write_text(BAD)
    nb = execute(tmp_path / "good.md")
    out = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                  for o in c.outputs if o["output_type"] == "stream")
    assert f"good-output-5821 {os.environ['STUDY_SIZE']}" in out  # STUDY_SIZE reaches the kernel
    with pytest.raises(NotebookFailed) as err:
        execute(tmp_path / "bad.md")
    msg = str(err.value)
    assert "bad.md" in msg and "code cell 2 of 2" in msg
    assert 'raise RuntimeError("deliberate failure 7431")' in msg  # the cell source
    assert "RuntimeError: deliberate failure 7431" in msg  # the error
    assert "\x1b[" not in msg


@pytest.mark.notebook
def test_book_build_fails_on_a_failing_cell(tmp_path):
    """A tiny book with the real _config.yml: the bad page fails the build, nothing else warns.

    The toc lists the bad page first, but pages are executed in sorted docname order, which is
    what puts notebooks/99_claims.md after the chapters in the real book: checked here too.
    """
    static = ROOT / "book" / "_static"
    if not (static / "mathjax" / "tex-svg.js").is_file():
        pytest.fail("book/_static/mathjax/tex-svg.js is missing: run `make test` (it fetches "
                    "MathJax once with npm) instead of calling pytest directly", pytrace=False)
    book, nbs = tmp_path / "book", tmp_path / "notebooks"
    book.mkdir()
    nbs.mkdir()
    shutil.copy(ROOT / "book" / "_config.yml", book)
    shutil.copy(ROOT / "book" / "references.bib", book)
    shutil.copytree(ROOT / "book" / "_ext", book / "_ext")
    (book / "_static").symlink_to(static, target_is_directory=True)
    (book / "intro.md").write_text("# Tiny book\n\nA throwaway book built by the test suite.\n")
    toc = {"format": "jb-book", "root": "book/intro",
           "chapters": [{"file": "notebooks/50_bad"}, {"file": "notebooks/00_good"}]}
    (book / "_toc.yml").write_text(yaml.safe_dump(toc))
    (nbs / "00_good.md").write_text(GOOD)
    (nbs / "50_bad.md").write_text(BAD)

    env = dict(os.environ, STAMP_RESULTS=str(tmp_path / "results"))
    jb = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(jb), "build", ".", "--config", "book/_config.yml", "--toc", "book/_toc.yml",
           "--all", "-W", "-n", "--keep-going"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = _ANSI.sub("", proc.stdout + proc.stderr)

    assert proc.returncode != 0, f"the build passed despite a failing cell:\n{log[-4000:]}"
    warnings = [ln for ln in log.splitlines() if re.search(r"\b(WARNING|ERROR): ", ln)]
    assert any("50_bad" in ln for ln in warnings), f"no warning names the bad page:\n{log[-4000:]}"
    others = [ln for ln in warnings if "50_bad" not in ln]
    assert not others, "the book configuration itself warns (make book would fail):\n" + "\n".join(others)
    executed = re.findall(r"notebooks/(\d\d_\w+)\.md", "\n".join(
        ln for ln in log.splitlines() if "Executing notebook using" in ln))
    assert executed == ["00_good", "50_bad"], f"execution order {executed}, expected sorted docnames"

    html = tmp_path / "_build" / "html"
    page = (html / "notebooks" / "00_good.html").read_text()
    assert f"good-output-5821 {os.environ['STUDY_SIZE']}" in page  # executed, output rendered
    assert "stderr-marker-4410" not in page  # stderr removed (execute.stderr_output)
    assert re.search(r'<script[^>]+src="[^"]*_static/mathjax/tex-svg\.js', page), "MathJax not local"
    sys.path.insert(0, str(ROOT / ".ci"))
    try:
        from check_offline import remote_loads
    finally:
        sys.path.pop(0)
    assert remote_loads(html) == []


# ---------------------------------------------------------------------------------------------
# The claims page reads the registry and the results files generically.

def _outputs(nb) -> str:
    return "\n".join(o.get("data", {}).get("text/markdown", "") + o.get("data", {}).get("text/html", "")
                     + o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.notebook
def test_claims_page_shows_both_sizes_and_every_registered_claim(tmp_path, monkeypatch):
    import json

    from stamp_lib.book import study

    small, full = tmp_path / "small", tmp_path / "full"
    monkeypatch.setenv("STAMP_RESULTS", str(small))
    monkeypatch.setenv("STAMP_FULL_RESULTS", str(full))
    monkeypatch.setenv("STUDY_SIZE", "small")
    run = study.start("01_theorem1")
    run.verdict("theorem1_holds", "confirmed: holds-7319", "worst ratio 0.0731",
                numbers={"worst ratio": 0.0731}, conditions={"s": 256, "avg bits": 5.0})
    run.save()
    monkeypatch.setenv("STAMP_RESULTS", str(tmp_path / "scratch"))
    monkeypatch.setenv("STUDY_SIZE", "full")
    run = study.start("01_theorem1")
    run.verdict("theorem1_holds", "confirmed: full-2288", "worst ratio 0.0422", conditions={"s": 2048})
    rec = json.loads(run.save().read_text())                    # stored as make record-full does
    rec["code"]["files"]["stamp_lib/core/quant.py"] = "0" * 64      # its code changed since: stale
    study.write_full_record(rec, full)
    monkeypatch.setenv("STAMP_RESULTS", str(small))
    page = ROOT / "notebooks" / "99_claims.md"
    out = _outputs(execute(page, cwd=ROOT / "notebooks"))
    assert "**confirmed: holds-7319**: worst ratio 0.0731 (s = 256, avg bits 5; chapter 01_theorem1)" in out
    assert "**confirmed: full-2288** (stale): worst ratio 0.0422 (s = 2048; chapter 01_theorem1)" in out
    for c in claims.CLAIMS.values():                   # every registered claim, tested or not
        assert c.title in out and c.paper in out
    assert "not tested" in out and "stale" in out

    (small / "02_real_activations.json").write_text(json.dumps(
        {"notebook": "02_real_activations", "verdicts": [{"key": "theorem_1_holds", "verdict": "confirmed"}]}))
    with pytest.raises(NotebookFailed, match="02_real_activations: verdict key 'theorem_1_holds'"):
        execute(page, cwd=ROOT / "notebooks")
