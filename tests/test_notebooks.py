"""Every notebook of the book executed as a test, and proofs that the pipeline catches failures.

* ``test_notebook[<stem>]``: one test per ``notebooks/*.md`` (MyST markdown), run through the
  book's own execution cache (``.ci/nbcache.py``): read with myst-nb's reader, executed by
  myst-nb's cache client with the ``execute:`` settings of ``book/_config.yml`` (this venv's
  ``python3`` kernel, cwd ``notebooks/``, STUDY_SIZE from the environment, ``small`` by default,
  see conftest.py) and stored in the cache folder of the current key, so that ``make book``
  afterwards executes nothing; a notebook already in that cache is not executed again, but its
  stored outputs are checked all the same. Sorted by name, so ``99_claims`` runs after the
  chapters whose results it summarises. A failing cell fails the test with the notebook, the
  cell number, its source and the error (a failing notebook is never cached).
  Its outputs must fit the book's column: printed lines of at most ``plotting.TEXT_COLS``
  characters, and every figure drawn by ``plotting.show`` (which refuses illegible ones).
* ``test_notebook_source_conventions``: static checks of every notebook (no code cell longer
  than a screen, visible code lines within the column, no "(printed above)" in the prose, no
  ``plt.show()``). A ``{glue:text}`` name that is never glued fails the book build (-W).
* ``test_executor_*`` and ``test_book_build_*`` run a throwaway notebook with a deliberately
  raising cell (in ``tmp_path``, never in the book) and check that the executor and a tiny book
  built with the real ``book/_config.yml`` both fail on it, while a sound notebook next to it
  passes, renders, and loads nothing from the network.
* ``test_book_and_tests_share_one_keyed_cache``: the tiny book again, its notebooks first run by
  the tests' executor, then built: nothing executes twice, a changed notebook (or STUDY_SIZE, or
  a ``stamp_lib`` file) executes again, and the summary page follows the chapters' results.
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
sys.path.insert(0, str(ROOT / ".ci"))
import nbcache  # noqa: E402

sys.path.pop(0)
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.md"))  # 99_claims last
CELL_TIMEOUT = 1800  # seconds per cell, as execute.timeout in book/_config.yml
MAX_CELL_LINES = 30  # a code cell fits on a screen
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
HIDDEN = {"hide-input", "remove-input", "remove-cell", "hide-cell"}


_GLUE_REF = re.compile(r"\{glue(?::[a-z]+)?\}`([^`<]+?)(?:\s*<[^`]*>)?`")


def missing_glue(nb, glued=()) -> list[str]:
    """Keys that the prose of an executed notebook cites (``{glue:text}`key```, ``{glue}``,
    ``{glue:figure}``, ...) but that no cell glued (``glued``: keys myst-nb already moved out of
    the notebook's outputs): the book build fails on them."""
    cited = {m.group(1).strip() for c in nb.cells if c.cell_type == "markdown"
             for m in _GLUE_REF.finditer(c.source)}
    glued = set(glued) | {o.get("metadata", {}).get("scrapbook", {}).get("name") for c in nb.cells
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


def failure(path: Path, nb, error: str, detail: str = "") -> NotebookFailed:
    """The report of a failed run: the notebook, the failing cell (1-based index among the code
    cells), its source and the error with its traceback (colour codes removed). The failing cell
    is the one with an error output, else (timeout, dead kernel) the last one that started."""
    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [(k, c) for k, c in enumerate(code, 1)
              if any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    started = [(k, c) for k, c in enumerate(code, 1) if c.get("execution_count") is not None]
    where = ""
    if errors or started:
        k, cell = (errors or started)[-1]
        where = f"code cell {k} of {len(code)}:\n{cell.source}\n{'-' * 40}\n"
        out = next((o for o in cell.get("outputs", []) if o.get("output_type") == "error"), None)
        if out is not None:
            detail = "\n".join(out.get("traceback", [])) or f"{out.get('ename')}: {out.get('evalue')}"
    return NotebookFailed(f"{path.name}: {error} in {where}{_ANSI.sub('', detail or '')[-6000:]}")


def execute(path: Path, cwd: Path | None = None, timeout: int = CELL_TIMEOUT):
    """Execute the MyST notebook ``path`` in a fresh kernel, without any cache (for throwaway
    settings such as a monkeypatched STAMP_RESULTS); return the executed notebook.

    Raises :class:`NotebookFailed` (see :func:`failure`).
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
        raise failure(path, nb, type(exc).__name__, str(exc)) from None
    return nb


def execute_cached(path: Path, srcdir: Path = ROOT, config: Path | None = None) -> nbcache.Outcome:
    """Run ``path`` as the book build of ``srcdir`` does, through its keyed execution cache
    (executes only if needed); raises :class:`NotebookFailed` (see :func:`failure`)."""
    out = nbcache.execute(path, srcdir=srcdir, config_yml=config)
    if out.error:
        raise failure(path, out.notebook, out.error, out.traceback or "")
    return out


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook(path: Path):
    try:
        out = execute_cached(path)
    except NotebookFailed as exc:
        pytest.fail(str(exc), pytrace=False)
    nb = out.notebook
    bad = output_offences(nb)
    assert not bad, f"{path.name}: outputs wider than the book's column:\n" + "\n".join(bad)
    missing = missing_glue(nb, out.glued)
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


# Bookkeeping stays off the pages: the cells that start a run, attach verdicts or save the
# results file are removed from the page (``:tags: [remove-cell]``). Chapters still to be
# cleaned are listed (strict xfail: cleaning one makes its entry fail until it is removed).
BOOKKEEPING = re.compile(r"\bstudy\.start\(|\brun\.verdict\(|\brun\.save\(")
BOOKKEEPING_TODO: dict[str, str] = {}


def visible_bookkeeping(nb) -> list[str]:
    """The code cells (1-based) that call study.start, run.verdict or run.save but are shown."""
    code = [c for c in nb.cells if c.cell_type == "code"]
    return [f"code cell {k}: {BOOKKEEPING.search(c.source).group(0)}...) is shown on the page: tag the cell "
            "remove-cell" for k, c in enumerate(code, 1)
            if BOOKKEEPING.search(c.source) and "remove-cell" not in c.metadata.get("tags", [])]


@pytest.mark.parametrize("path", [
    pytest.param(p, marks=pytest.mark.xfail(strict=True, reason=BOOKKEEPING_TODO[p.stem]))
    if p.stem in BOOKKEEPING_TODO else p for p in NOTEBOOKS], ids=[p.stem for p in NOTEBOOKS])
def test_no_bookkeeping_on_the_page(path: Path):
    bad = visible_bookkeeping(jupytext.read(path))
    assert not bad, f"{path.name}:\n" + "\n".join(bad)


def test_visible_bookkeeping_is_found():
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("run = study.start('x')"),
        nbformat.v4.new_code_cell("run.save()", metadata={"tags": ["remove-cell"]}),
        nbformat.v4.new_code_cell("run.verdict('k', 'confirmed', 'x')", metadata={"tags": ["hide-input"]})])
    assert [b.split(":")[0] for b in visible_bookkeeping(nb)] == ["code cell 1", "code cell 3"]


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


CHAPTER = HEADER + """
# A chapter that writes a results file

```{code-cell} ipython3
:tags: [remove-input]

import json, os
from pathlib import Path

VALUE = "chapter-value-1"
out = Path(os.environ["STAMP_RESULTS"])
out.mkdir(parents=True, exist_ok=True)
(out / "10_chapter.json").write_text(json.dumps({"value": VALUE}))
```
"""

SUMMARY = HEADER + """
# A summary page (99_*): reads the results files of the chapters

```{code-cell} ipython3
import json, os
from pathlib import Path

for p in sorted(Path(os.environ["STAMP_RESULTS"]).glob("*.json")):
    print("summary-of", p.stem, json.loads(p.read_text())["value"])
```
"""


def tiny_book(tmp_path: Path, pages: dict[str, str]) -> Path:
    """A throwaway book in ``tmp_path`` with the real ``book/_config.yml`` (and its extensions,
    .ci/nbcache.py among them): ``notebooks/<stem>.md`` for each page, listed in the toc in the
    order given (pages are executed in sorted order whatever the toc says)."""
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
    (tmp_path / ".ci").symlink_to(ROOT / ".ci", target_is_directory=True)  # local_extensions: ../.ci
    (book / "intro.md").write_text("# Tiny book\n\nA throwaway book built by the test suite.\n")
    toc = {"format": "jb-book", "root": "book/intro", "chapters": [{"file": f"notebooks/{n}"} for n in pages]}
    (book / "_toc.yml").write_text(yaml.safe_dump(toc))
    for name, text in pages.items():
        (nbs / f"{name}.md").write_text(text)
    return tmp_path


def build(src: Path, **env) -> tuple[int, str, list[str]]:
    """``jupyter-book build`` of ``src`` as ``make book`` runs it: (exit code, log, the pages
    executed in order). ``env`` overrides environment variables."""
    jb = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(jb), "build", ".", "--config", "book/_config.yml", "--toc", "book/_toc.yml",
           "--all", "-W", "-n", "--keep-going"]
    proc = subprocess.run(cmd, cwd=src, env=dict(os.environ, **env), capture_output=True, text=True,
                          timeout=600)
    log = _ANSI.sub("", proc.stdout + proc.stderr)
    executed = re.findall(r"notebooks/(\d\d_\w+)\.md", "\n".join(
        ln for ln in log.splitlines() if "Executing notebook using" in ln))
    return proc.returncode, log, executed


def page(src: Path, name: str) -> str:
    return (src / "_build" / "html" / "notebooks" / f"{name}.html").read_text()


@pytest.mark.notebook
def test_executor_reports_a_failing_cell(tmp_path):
    """The notebook tests' executor (the book's keyed cache): STUDY_SIZE reaches the kernel, a
    sound notebook is executed once and then served from the cache, a failing one is reported
    with its cell and never cached."""
    src = tiny_book(tmp_path, {"00_good": GOOD, "50_bad": BAD})
    good, bad = src / "notebooks" / "00_good.md", src / "notebooks" / "50_bad.md"
    config = src / "book" / "_config.yml"
    first = execute_cached(good, src, config)
    out = "".join(o.get("text", "") for c in first.notebook.cells if c.cell_type == "code"
                  for o in c.outputs if o["output_type"] == "stream")
    assert f"good-output-5821 {os.environ['STUDY_SIZE']}" in out  # STUDY_SIZE reaches the kernel
    assert first.executed and not execute_cached(good, src, config).executed
    for _ in range(2):  # not cached: it fails the second time too
        with pytest.raises(NotebookFailed) as err:
            execute_cached(bad, src, config)
        msg = str(err.value)
        assert "50_bad.md" in msg and "code cell 2 of 2" in msg
        assert 'raise RuntimeError("deliberate failure 7431")' in msg  # the cell source
        assert "RuntimeError: deliberate failure 7431" in msg  # the error
        assert "\x1b[" not in msg


@pytest.mark.notebook
def test_book_build_fails_on_a_failing_cell(tmp_path):
    """A tiny book with the real _config.yml: the bad page fails the build, nothing else warns.

    The toc lists the bad page first, but pages are executed in sorted docname order, which is
    what puts notebooks/99_claims.md after the chapters in the real book: checked here too.
    A failing page is not cached: the second build executes it (alone) and fails again.
    """
    src = tiny_book(tmp_path, {"50_bad": BAD, "00_good": GOOD})
    rc, log, executed = build(src)

    assert rc != 0, f"the build passed despite a failing cell:\n{log[-4000:]}"
    warnings = [ln for ln in log.splitlines() if re.search(r"\b(WARNING|ERROR): ", ln)]
    assert any("50_bad" in ln for ln in warnings), f"no warning names the bad page:\n{log[-4000:]}"
    others = [ln for ln in warnings if "50_bad" not in ln]
    assert not others, "the book configuration itself warns (make book would fail):\n" + "\n".join(others)
    assert executed == ["00_good", "50_bad"], f"execution order {executed}, expected sorted docnames"

    html = src / "_build" / "html"
    text = page(src, "00_good")
    assert f"good-output-5821 {os.environ['STUDY_SIZE']}" in text  # executed, output rendered
    assert "stderr-marker-4410" not in text  # stderr removed (execute.stderr_output)
    assert re.search(r'<script[^>]+src="[^"]*_static/mathjax/tex-svg\.js', text), "MathJax not local"
    sys.path.insert(0, str(ROOT / ".ci"))
    try:
        from check_offline import remote_loads
    finally:
        sys.path.pop(0)
    assert remote_loads(html) == []

    rc, log, executed = build(src)
    assert rc != 0 and executed == ["50_bad"], f"second build executed {executed}, rc {rc}"


@pytest.mark.notebook
def test_book_and_tests_share_one_keyed_cache(tmp_path):
    """What `make test` then `make book` do, on a tiny book: the tests' executor fills the
    cache, the build executes nothing; a changed chapter executes again and so does the summary
    page (99_*) that reads its results file; a chapter served from the cache restores its
    results file; another STUDY_SIZE or a changed stamp_lib file is another key (executes all);
    a stale folder of the same size is pruned, the other size's is kept."""
    pages = {"00_good": GOOD, "10_chapter": CHAPTER, "99_summary": SUMMARY}
    src = tiny_book(tmp_path, pages)
    config = src / "book" / "_config.yml"
    size = os.environ["STUDY_SIZE"]
    other = "full" if size == "small" else "small"
    for name in pages:                                  # make test
        assert execute_cached(src / "notebooks" / f"{name}.md", src, config).executed, name

    def built(expect: list[str], **env) -> None:
        rc, log, executed = build(src, **env)
        assert rc == 0, f"the build failed:\n{log[-4000:]}"
        assert executed == expect, f"executed {executed}, expected {expect}:\n{log[-3000:]}"

    built([])                                           # make book: every page from the cache
    assert f"good-output-5821 {size}" in page(src, "00_good")
    assert "summary-of 10_chapter chapter-value-1" in page(src, "99_summary")

    chapter = src / "notebooks" / "10_chapter.md"
    chapter.write_text(CHAPTER.replace("chapter-value-1", "chapter-value-2"))
    built(["10_chapter", "99_summary"])                 # a changed code cell, and its summary
    assert "summary-of 10_chapter chapter-value-2" in page(src, "99_summary")
    chapter.write_text(CHAPTER)
    built(["99_summary"])                               # the chapter's old record, with its results
    assert "summary-of 10_chapter chapter-value-1" in page(src, "99_summary")

    built(list(pages), STUDY_SIZE=other)                # another STUDY_SIZE: another key
    assert f"good-output-5821 {other}" in page(src, "00_good")
    (src / "stamp_lib").mkdir()
    (src / "stamp_lib" / "edited.py").write_text("X = 1\n")
    built(list(pages))                                  # library code changed: another key
    folders = sorted(d.name.split("-")[0] for d in (src / "_build" / "nbcache").iterdir())
    assert folders == sorted([size, other]), folders    # the old folder of this size is pruned


def test_cache_key_covers_what_the_notebooks_read(tmp_path):
    """No kernel: the key changes with STUDY_SIZE and with each kind of input file, not with others."""
    files = ["stamp_lib/core/a.py", "data/results/full/01.json.gz", "data/prompts/p.txt",
             "requirements.txt", "requirements-models.txt"]
    for f in files + ["notebooks/01.md", "stamp_lib/README.txt", "data/cache/model.bin"]:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("0")
    k = nbcache.key(tmp_path, "small")
    assert k.startswith("small-") and nbcache.key(tmp_path, "full").startswith("full-")
    for f in ["notebooks/01.md", "stamp_lib/README.txt", "data/cache/model.bin"]:
        (tmp_path / f).write_text("1")
        assert nbcache.key(tmp_path, "small") == k, f"{f} changed the key"
    seen = {k}
    for f in files:
        (tmp_path / f).write_text("1")
        seen.add(nbcache.key(tmp_path, "small"))
        assert len(seen) == files.index(f) + 2, f"{f} did not change the key"


def test_cache_prune_keeps_the_other_size(tmp_path):
    for d in ["small-aaaa", "small-bbbb", "full-cccc", "smallish-dddd"]:
        (tmp_path / d).mkdir()
    gone = nbcache.prune(tmp_path / "small-bbbb")
    assert [p.name for p in gone] == ["small-aaaa"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full-cccc", "small-bbbb", "smallish-dddd"]


# ---------------------------------------------------------------------------------------------
# make record-full: executes without the cache (a full record needs a fresh full-size run).

@pytest.mark.notebook
def test_record_full_stores_the_chapter_results_compressed(tmp_path, monkeypatch):
    """One throwaway chapter through record(): executed at full size (whatever the caller's
    STUDY_SIZE), stored as .json.gz."""
    sys.path.insert(0, str(ROOT / ".ci"))
    try:
        import record_full
    finally:
        sys.path.pop(0)
    from stamp_lib.book import study

    monkeypatch.setenv("STUDY_SIZE", "small")                 # record() changes both; restored after
    monkeypatch.setenv("STAMP_RESULTS", str(tmp_path / "unused"))
    nb = tmp_path / "zz_tiny.md"
    nb.write_text("---\nkernelspec:\n  name: python3\n  display_name: Python 3\n---\n\n"
                  "```{code-cell} ipython3\nfrom stamp_lib.book import study\n"
                  "run = study.start('zz_tiny')\nrun.record('x', study.size() == 'full', s=2048)\n"
                  "run.save()\n```\n")
    record_full.record(nb, tmp_path / "full")
    data = study.read_full_record(tmp_path / "full" / "zz_tiny.json.gz")
    assert data["size"] == "full" and data["records"][0]["value"] is True


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
    assert "**confirmed: holds-7319**: worst ratio 0.0731 (s = 256, avg bits 5; chapter “The error bound”)" in out
    assert "**confirmed: full-2288** (stale): worst ratio 0.0422 (s = 2048; chapter “The error bound”)" in out
    assert "theorem1_holds" not in out                   # no claim key, no bookkeeping on the page
    for c in claims.CLAIMS.values():                   # every registered claim, tested or not
        assert c.title in out and c.paper in out
    assert "not tested" in out and "stale" in out

    (small / "02_real_activations.json").write_text(json.dumps(
        {"notebook": "02_real_activations", "verdicts": [{"key": "theorem_1_holds", "verdict": "confirmed"}]}))
    with pytest.raises(NotebookFailed, match="02_real_activations: verdict key 'theorem_1_holds'"):
        execute(page, cwd=ROOT / "notebooks")
