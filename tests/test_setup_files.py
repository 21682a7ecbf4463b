"""The set-up files agree with each other: environment.yml, requirements, CI, README, book toc.

Fast (no build, no kernel); the build itself is tested in tests/test_notebooks.py.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / ".ci"))
from check_legible import check_page, png_info  # noqa: E402
from check_offline import remote_loads  # noqa: E402

sys.path.pop(0)
from stamp_lib.book.plotting import TEXT_COLS  # noqa: E402


def _requirements(path: Path) -> dict[str, Requirement]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            r = Requirement(line)
            out[r.name.lower().replace("_", "-")] = r
    return out


def _toc_files(node) -> list[str]:
    """Every ``file:``/``root:`` entry of a sphinx-external-toc tree, in toc order."""
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("root", "file"):
                out.append(v)
            else:
                out += _toc_files(v)
    elif isinstance(node, list):
        for v in node:
            out += _toc_files(v)
    return out


# ---- environment.yml ------------------------------------------------------------------------

def test_environment_yml_matches_requirements():
    text = (ROOT / "environment.yml").read_text()
    env = yaml.safe_load(text)
    deps = env["dependencies"]
    conda = [d for d in deps if isinstance(d, str)]
    pip = [d for d in deps if isinstance(d, dict)]
    assert "python=3.11" in conda, f"environment.yml must pin python=3.11, has {conda}"
    # every Python package comes from requirements.txt: conda adds only python, pip and nodejs
    extra = {re.split(r"[=<>! ]", d)[0] for d in conda} - {"python", "pip", "nodejs"}
    assert not extra, f"environment.yml installs {extra} outside requirements.txt"
    assert len(pip) == 1 and "-r requirements.txt" in pip[0]["pip"], "pip section must read requirements.txt"
    for line in pip[0]["pip"]:
        if not line.startswith("-"):
            req = _requirements(ROOT / "requirements.txt")
            name = Requirement(line).name.lower()
            assert name in req and str(req[name]) == line, f"{line} disagrees with requirements.txt"
    # --no-deps cannot be written in a conda pip section: the file must say how to install them
    assert "requirements-models.txt" in text and "--no-deps" in text


def test_python_version_is_allowed_by_pyproject():
    import tomllib

    spec = SpecifierSet(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])
    assert "3.11" in spec


def test_model_packages_are_pinned_and_apart():
    """requirements-models.txt is installed with --no-deps, so every line must be an exact pin,
    and none of them may also appear in requirements.txt (that would install its dependencies)."""
    models = _requirements(ROOT / "requirements-models.txt")
    main = _requirements(ROOT / "requirements.txt")
    assert models
    for name, r in models.items():
        assert str(r.specifier).startswith("=="), f"{name} is not pinned exactly"
        assert name not in main, f"{name} is in both requirements files"


# ---- CI, Makefile, README -------------------------------------------------------------------

def test_ci_runs_make_test():
    ci = ROOT / ".ci" / "run"
    lines = [ln.strip() for ln in ci.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert "set -euo pipefail" in lines
    assert lines[-1] == "make test" and sum("make" in ln for ln in lines) == 1, lines
    assert os.access(ci, os.X_OK), ".ci/run is not executable"


def test_makefile_targets():
    mk = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z-]+):", mk, flags=re.M))
    assert {"book", "test", "unit", "bench", "lab", "clean", "record-full"} <= targets, targets
    record = re.search(r"^record-full:.*\n((?:\t.*\n)+)", mk, flags=re.M).group(1)
    assert ".ci/record_full.py $(NB)" in record
    lab = re.search(r"^lab:.*\n((?:\t.*\n)+)", mk, flags=re.M).group(1)
    assert "pip install" not in lab, "JupyterLab and jupyterlab-myst come pinned from requirements.txt"
    assert re.search(r"^test: .*\n\t\$\(BIN\)/pytest -q tests$", mk, flags=re.M)
    book = re.search(r"^book:.*\n((?:\t.*\n)+)", mk, flags=re.M).group(1)
    assert "--all -W -n --keep-going" in book and "check_offline.py _build/html" in book
    assert "--no-deps -r requirements-models.txt" in mk and "--no-deps -e ." in mk
    assert "export STUDY_SIZE ?= small" in mk and "export HF_HUB_OFFLINE := 1" in mk


def test_readme_gives_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    commands = [ln.split("#")[0].strip() for ln in blocks[0].splitlines()]
    assert [c for c in commands if c] == ["make book", "make test"]
    assert "STUDY_SIZE=full make book" in readme and "_build/html" in readme
    assert "requirements-models.txt" in readme and "--no-deps" in readme


# ---- book -----------------------------------------------------------------------------------

def test_toc_lists_every_notebook_and_every_entry_exists():
    toc = yaml.safe_load((ROOT / "book" / "_toc.yml").read_text())
    files = _toc_files(toc)
    docnames = [re.sub(r"\.(md|ipynb)$", "", f) for f in files]
    missing = [d for d in docnames if not any((ROOT / f"{d}{s}").is_file() for s in (".md", ".ipynb"))]
    assert not missing, f"book/_toc.yml lists files that do not exist: {missing}"
    notebooks = {f"notebooks/{p.stem}" for p in (ROOT / "notebooks").glob("*.md")}
    unlisted = sorted(notebooks - set(docnames))
    assert not unlisted, f"notebooks missing from book/_toc.yml: {unlisted}"
    assert len(set(docnames)) == len(docnames), "a file is listed twice in the toc"


def test_claims_page_is_executed_last():
    """Sphinx reads (and so executes) documents in sorted docname order, not toc order."""
    docnames = [re.sub(r"\.(md|ipynb)$", "", f)
                for f in _toc_files(yaml.safe_load((ROOT / "book" / "_toc.yml").read_text()))]
    assert sorted(docnames)[-1] == "notebooks/99_claims", sorted(docnames)
    assert sorted(p.stem for p in (ROOT / "notebooks").glob("*.md"))[-1] == "99_claims"


def test_book_config_is_strict_and_offline():
    cfg = yaml.safe_load((ROOT / "book" / "_config.yml").read_text())
    ex = cfg["execute"]
    assert ex["execute_notebooks"] == "force" and ex["allow_errors"] is False
    assert ex["timeout"] >= 1800 and ex["stderr_output"] in ("remove", "show")
    sc = cfg["sphinx"]["config"]
    assert not re.match(r"(https?:)?//", sc["mathjax_path"]), "MathJax must be served locally"
    assert sc["html_static_path"] == ["book/_static"] and sc["nb_ipywidgets_js"] == {}
    assert "sphinx_proof" in cfg["sphinx"]["extra_extensions"]
    assert cfg["bibtex_bibfiles"] == ["book/references.bib"]
    for d in (".venv", "data", "tests", "_build"):
        assert d in cfg["exclude_patterns"]
    gitignore = (ROOT / ".gitignore").read_text()
    assert "book/_static/mathjax/" in gitignore and "_build/" in gitignore


def test_cited_keys_exist_in_bibliography():
    bib = (ROOT / "book" / "references.bib").read_text()
    keys = set(re.findall(r"^@\w+\{([^,\s]+),", bib, flags=re.M))
    assert "federici2026stamp" in keys
    pages = [ROOT / "book" / "intro.md", *sorted((ROOT / "notebooks").glob("*.md"))]
    for page in pages:
        for group in re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", page.read_text()):
            for key in group.split(","):
                assert key.strip() in keys, f"{page.name} cites unknown key {key.strip()!r}"


# ---- the offline checker --------------------------------------------------------------------

@pytest.mark.parametrize("html, n_bad", [
    ('<script src="https://cdn.example.org/x.js"></script>', 1),
    ('<link rel="stylesheet" href="//fonts.example.org/f.css">', 1),
    ('<img src="http://example.org/a.png">', 1),
    ('<script src="_static/mathjax/tex-svg.js"></script><link href="_static/a.css">', 0),
    ('<a href="https://arxiv.org/abs/2510.26771">paper</a>', 0),  # a link loads nothing
])
def test_check_offline_flags_remote_loads(tmp_path, html, n_bad):
    (tmp_path / "page.html").write_text(f"<html><head>{html}</head><body></body></html>")
    assert len(remote_loads(tmp_path)) == n_bad


def test_check_offline_flags_remote_css(tmp_path):
    (tmp_path / "page.html").write_text("<html></html>")
    (tmp_path / "a.css").write_text("@import url('https://fonts.example.org/x.css'); b{}")
    (tmp_path / "b.css").write_text("i { background: url(img/local.png) }")
    assert [ln.split(":")[0] for ln in remote_loads(tmp_path)] == ["a.css"]


# ---- JupyterLab -----------------------------------------------------------------------------

def test_lab_packages_are_pinned():
    req = _requirements(ROOT / "requirements.txt")
    for name in ("jupyterlab", "jupyterlab-myst", "jupytext"):
        assert name in req and str(req[name].specifier).startswith("=="), f"{name} is not pinned"


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.md")), ids=lambda p: p.stem)
def test_opening_and_saving_in_jupyterlab_changes_nothing(tmp_path, path):
    """What JupyterLab does with `make lab`: jupytext's contents manager reads the .md, the kernel
    started from this venv's kernelspec is written into the metadata, the notebook is saved.
    The file must come back byte for byte (else `git status` is dirty after merely opening it)."""
    import asyncio

    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager
    from jupytext.async_contentsmanager import (
        build_async_jupytext_contents_manager_class,
    )

    spec = KernelSpecManager(kernel_dirs=[str(ROOT / ".venv" / "share" / "jupyter" / "kernels")]).get_kernel_spec("python3")
    (tmp_path / path.name).write_bytes(path.read_bytes())
    cm = build_async_jupytext_contents_manager_class(AsyncLargeFileManager)(root_dir=str(tmp_path))

    async def open_and_save():
        nb = (await cm.get(path.name, type="notebook", content=True))["content"]
        nb.metadata["kernelspec"] = {"display_name": spec.display_name, "language": spec.language, "name": "python3"}
        nb.metadata["language_info"] = {"name": "python", "version": "3.11", "mimetype": "text/x-python"}
        await cm.save({"type": "notebook", "format": "json", "content": nb}, path.name)

    asyncio.run(open_and_save())
    after = (tmp_path / path.name).read_text()
    assert after == path.read_text(), (
        f"{path.name}: a JupyterLab save rewrites the file; make its header say kernelspec display_name "
        f"{spec.display_name!r} and jupytext_version of the pinned jupytext")


# ---- glossary and bibliography ----------------------------------------------------------------

def test_every_term_used_is_in_the_glossary():
    text = (ROOT / "book" / "glossary.md").read_text()
    body = text[text.index("```{glossary}"):]
    terms = {ln.strip().lower() for ln in body.splitlines()[1:] if ln and not ln.startswith((" ", "`"))}
    pages = [ROOT / "book" / "intro.md", *sorted((ROOT / "notebooks").glob("*.md"))]
    for page in pages:
        for ref in re.findall(r"\{term\}`([^`]+)`", page.read_text()):
            m = re.search(r"<([^>]+)>$", ref)
            term = (m.group(1) if m else ref).strip().lower()
            assert term in terms, f"{page.name} uses {{term}}`{ref}`, which book/glossary.md does not define"


def test_bibliography_labels_are_author_year():
    """book/_ext/bibstyle.py labels the reference list like the citations in the text."""
    import importlib.util

    from pybtex.database import parse_file

    spec = importlib.util.spec_from_file_location("bibstyle", ROOT / "book" / "_ext" / "bibstyle.py")
    bibstyle = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bibstyle)
    bib = parse_file(str(ROOT / "book" / "references.bib"))
    labels = {k: bibstyle.author_year_label(e) for k, e in bib.entries.items()}
    assert labels["federici2026stamp"] == "Federici et al., 2026"
    assert labels["haar1910"] == "Haar, 1910"
    assert labels["grattafiori2024llama3"] == "Grattafiori et al., 2024"
    assert not any("others" in v or "{" in v or "\\" in v for v in labels.values()), labels
    cfg = yaml.safe_load((ROOT / "book" / "_config.yml").read_text())
    assert cfg["sphinx"]["config"]["bibtex_default_style"] == "authoryear"
    assert cfg["sphinx"]["config"]["bibtex_reference_style"] == "author_year"
    # two authors plus "and others" would print "X and others" in the text: give three or more
    for key, entry in bib.entries.items():
        names = [str(p) for p in entry.persons.get("author", [])]
        assert not (len(names) == 2 and names[-1] == "others"), f"{key}: list at least two authors before 'others'"


# ---- the legibility checker -----------------------------------------------------------------

def _png(tmp_path, name, font_pt=None, width_in=6.5):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width_in, 2))
    ax.plot([0, 1])
    meta = {"stamp:min_font_pt": str(font_pt)} if font_pt else {}
    fig.savefig(tmp_path / name, dpi=200, metadata=meta)
    plt.close(fig)
    return png_info((tmp_path / name).read_bytes())


def _page(tmp_path, body):
    page = tmp_path / "page.html"
    page.write_text(f'<html><body><main><div class="cell docutils container">'
                    f'<div class="cell_output docutils container">{body}</div></div></main></body></html>')
    return check_page(page)


def test_check_legible_passes_a_legible_page(tmp_path):
    info = _png(tmp_path, "ok.png", font_pt=9)
    assert info["width"] == 1300 and round(info["dpi"]) == 200 and info["text"]["stamp:min_font_pt"] == "9"
    body = ('<div class="output stream"><pre>' + "x" * TEXT_COLS + "</pre></div>"
            '<img src="ok.png" style="width: 650px;" />'
            "<table><tr><th>a</th><th>b</th></tr><tr><td>0.91</td><td>dct</td></tr></table>")
    assert _page(tmp_path, body) == []


@pytest.mark.parametrize("body, what", [
    ('<div class="output stream"><pre>' + "x" * (TEXT_COLS + 1) + "</pre></div>", "text output line of"),
    ('<img src="plain.png" />', "not drawn with stamp_lib.book.plotting.show"),
    ('<img src="small.png" />', "displayed at"),
    ("<table><tr><td>" + "w" * 50 + "</td><td>" + "v" * 50 + "</td></tr></table>", "px column"),
    ('<div class="output text_plain"><pre>PosixPath(&#39;/home/me/r.json&#39;)</pre></div>',
     "shows a path of the machine"),
])
def test_check_legible_flags_illegible_output(tmp_path, body, what):
    _png(tmp_path, "plain.png")
    _png(tmp_path, "small.png", font_pt=9, width_in=14)   # shown at 676 of 1400 px: 9 pt -> 4.4 pt
    bad = _page(tmp_path, body)
    assert len(bad) == 1 and what in bad[0], bad


# ---- make record-full -----------------------------------------------------------------------

def test_record_full_selects_chapters():
    sys.path.insert(0, str(ROOT / ".ci"))
    try:
        import record_full
    finally:
        sys.path.pop(0)
    every = record_full.chapters([])
    assert every and all(p.name[:2].isdigit() and not p.name.startswith("99") for p in every)
    assert [p.stem for p in record_full.chapters(["01_theorem1"])] == ["01_theorem1"]
    assert [p.stem for p in record_full.chapters(["notebooks/01_theorem1.md"])] == ["01_theorem1"]
    with pytest.raises(SystemExit, match="no notebook"):
        record_full.chapters(["07_nothing"])


@pytest.mark.notebook
def test_record_full_stores_the_chapter_results_compressed(tmp_path, monkeypatch):
    """One throwaway chapter through record(): executed at full size, stored as .json.gz."""
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
