"""Every notebook of the book executed as a test, and proofs that the pipeline catches failures.

* ``test_notebook[<stem>]``: one test per ``notebooks/*.md`` (MyST markdown, read with jupytext),
  executed top to bottom by nbclient with this venv's ``python3`` kernel, cwd ``notebooks/`` (as
  in the book build), STUDY_SIZE from the environment (``small`` by default, see conftest.py).
  Sorted by name, so ``99_claims`` runs after the chapters whose results it summarises. A failing
  cell fails the test with the notebook, the cell number, its source and the error.
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

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.md"))  # 99_claims last
CELL_TIMEOUT = 1800  # seconds per cell, as execute.timeout in book/_config.yml
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


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
        execute(path, cwd=ROOT / "notebooks")
    except NotebookFailed as exc:
        pytest.fail(str(exc), pytrace=False)


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
# The claims page matches verdicts to claims by key and flags unknown keys.

def _html_outputs(nb) -> str:
    return "\n".join(o.get("data", {}).get("text/html", "") + o.get("text", "")
                     for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.notebook
def test_claims_page_matches_verdicts_by_key(tmp_path, monkeypatch):
    from stamp_lib import study

    monkeypatch.setenv("STAMP_RESULTS", str(tmp_path))
    monkeypatch.setenv("STUDY_SIZE", "full")
    run = study.start("01_theorem1")
    run.verdict("the bound holds", "<= bound", "ratio 0.5", "holds-7319", key="theorem1_holds")
    run.verdict("dct_wht_dwt_close", "same", "same", "holds-2288")  # the key given as claim
    run.verdict("a finding of ours", "-", "3", "new-5512")  # no key: listed among all verdicts
    run.save()
    page = ROOT / "notebooks" / "99_claims.md"
    out = _html_outputs(execute(page, cwd=ROOT / "notebooks"))
    td = '<td style="vertical-align: top">'
    assert f"{td}holds-7319 (01_theorem1, full)</td>" in out
    assert f"{td}holds-2288 (01_theorem1, full)</td>" in out
    assert f"{td}new-5512</td>" in out and "2 of " in out and "not tested yet" in out

    run = study.start("02_real_activations")
    run.verdict("typo", "-", "-", "-", key="theorem_1_holds")
    run.save()
    with pytest.raises(NotebookFailed, match="02_real_activations: verdict key 'theorem_1_holds'"):
        execute(page, cwd=ROOT / "notebooks")
