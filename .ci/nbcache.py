"""One execution cache for the book build and the notebook tests, keyed by what the notebooks read.

myst-nb's ``execute_notebooks: cache`` mode (jupyter-cache) matches an executed notebook by its
code cells and kernelspec only. Our notebooks also read ``STUDY_SIZE``, import ``stamp_lib`` and
read ``data/results/full/``, ``data/results/paper/`` and ``data/prompts/``, so this module puts the cache in a folder per
*key*::

    <source folder>/_build/nbcache/<STUDY_SIZE>-<16 hex digits>/
        global.db, executed/      jupyter-cache (one record per executed notebook version)
        results/                  STAMP_RESULTS of every kernel run through this cache
        sidecars/<hashkey>.json   per record: the results file that run wrote, the summary inputs

The hex digits are a sha256 of every ``stamp_lib/**/*.py``, ``data/results/full/*``,
``data/results/paper/**/*.json`` (the paper's models, run elsewhere), ``data/prompts/*`` and
``requirements*.txt`` under the source folder (the repository root for
the book; :func:`key`). A new key starts an empty folder;
older folders of the same STUDY_SIZE are deleted (:func:`prune`), the other size's are kept.

Side effects. A chapter served from the cache does not run, so it does not write
``results/<chapter>.json``; the summary pages (``99_*.md``, executed last) read those files.
So each record keeps a copy of the results file its run wrote, and serving the record restores
it; a summary page's record is used only while the results files (and the list of notebooks)
are those it was executed with. A failing notebook is never cached.

Used by both paths, so they share hits:

* ``jupyter-book build`` (``make book``): the Sphinx extension of this module (listed in
  ``book/_config.yml``, ``sphinx.local_extensions``) sets ``nb_execution_cache_path`` (unless
  ``execute.cache`` is set) and ``STAMP_RESULTS``, and makes myst-nb use :class:`KeyedCacheClient`.
* ``tests/test_notebooks.py`` (``make test``): :func:`execute` reads the notebook with myst-nb's
  own reader and runs it through the same :class:`KeyedCacheClient` with the execution settings of
  ``book/_config.yml``.

``python .ci/nbcache.py`` prints the cache folder of the current STUDY_SIZE.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE_ROOT = Path("_build") / "nbcache"  # relative to the book's source folder
KEY_INPUTS = ("stamp_lib/**/*.py", "data/results/full/*", "data/results/paper/**/*.json", "data/prompts/*",
              "requirements*.txt")
SUMMARY_PREFIX = "99_"  # pages that summarise the results files of the other notebooks
KEEP_PER_NOTEBOOK = 2  # cached versions kept per notebook (the current one and the one before)
SIZES = ("small", "full")


def study_size() -> str:
    """STUDY_SIZE as the notebooks read it (``small`` unless set), for the folder name."""
    s = os.environ.get("STUDY_SIZE", "small").strip().lower() or "small"
    return re.sub(r"[^a-z0-9]+", "_", s)


def key(root: Path, size: str | None = None) -> str:
    """``<size>-<sha256[:16]>`` of the files in :data:`KEY_INPUTS` under ``root`` (name and bytes)."""
    h = hashlib.sha256()
    for pattern in KEY_INPUTS:
        for p in sorted(root.glob(pattern)):
            if p.is_file():
                h.update(f"{p.relative_to(root).as_posix()}\0{p.stat().st_size}\0".encode())
                h.update(p.read_bytes())
    return f"{size or study_size()}-{h.hexdigest()[:16]}"


@cache
def _session_key(root: Path, size: str) -> str:
    # one key per process: a file edited during a long `make test` does not split its cache
    return key(root, size)


def cache_dir(srcdir: Path, size: str | None = None) -> Path:
    """The cache folder of the current key for the book whose source folder is ``srcdir`` (the
    key is that of the files under ``srcdir``, computed once per process)."""
    srcdir = Path(srcdir).resolve()
    return srcdir / CACHE_ROOT / _session_key(srcdir, size or study_size())


def results_dir(cache_path: Path) -> Path:
    return Path(cache_path) / "results"


def prune(cache_path: Path) -> list[Path]:
    """Delete the other folders of the same STUDY_SIZE next to ``cache_path``; return them."""
    cache_path = Path(cache_path)
    size = cache_path.name.rsplit("-", 1)[0]
    gone = []
    if cache_path.parent.is_dir():
        for d in cache_path.parent.glob(f"{size}-*"):
            if d.is_dir() and d.name != cache_path.name and d.name.rsplit("-", 1)[0] == size:
                shutil.rmtree(d, ignore_errors=True)
                gone.append(d)
    return gone


def is_summary(path: Path) -> bool:
    return Path(path).name.startswith(SUMMARY_PREFIX)


def summary_inputs(results: Path, page: Path) -> str:
    """sha256 of what a summary page reads: every results file but its own, and the notebooks' names."""
    h = hashlib.sha256()
    for p in sorted(Path(results).glob("*.json")):
        if p.stem != Path(page).stem:
            h.update(f"{p.name}\0".encode() + p.read_bytes() + b"\0")
    h.update("\0".join(sorted(q.stem for q in Path(page).parent.glob("*.md"))).encode())
    return h.hexdigest()


# ---- the client: myst-nb's cache client plus keyed side effects ---------------------------------

def _client_base():
    from myst_nb.core.execute.cache import NotebookClientCache

    return NotebookClientCache


class _Sidecars:
    """``<cache>/sidecars/<hashkey>.json``: what a cached run left besides its outputs."""

    def __init__(self, cache_path: Path):
        self.dir = Path(cache_path) / "sidecars"

    def read(self, hashkey: str) -> dict | None:
        with suppress(OSError, ValueError):
            return json.loads((self.dir / f"{hashkey}.json").read_text())
        return None

    def write(self, hashkey: str, data: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{hashkey}.tmp"
        tmp.write_text(json.dumps(data))
        tmp.replace(self.dir / f"{hashkey}.json")

    def drop(self, hashkey: str) -> None:
        (self.dir / f"{hashkey}.json").unlink(missing_ok=True)


def _drop_record(jcache, record, sidecars: _Sidecars) -> None:
    from jupyter_cache.cache.db import NbCacheRecord

    try:
        jcache.remove_cache(record.pk)
    except KeyError:  # the notebook file of the record is gone: drop the record alone
        NbCacheRecord.remove_records([record.pk], jcache.db)
    sidecars.drop(record.hashkey)


class KeyedCacheClient(_client_base()):
    """myst-nb's ``NotebookClientCache`` (lookup, execution, storage unchanged) wrapped so that

    * a record without a sidecar (made by another tool) is dropped and the notebook executed;
    * a chapter's results file is restored from the record it is served from, and saved with
      the record when it is executed;
    * a summary page's record is dropped when the results files changed since it ran;
    * at most :data:`KEEP_PER_NOTEBOOK` records are kept per notebook.

    ``executed`` tells whether this client ran the notebook (False: served from the cache).
    """

    executed: bool = False

    def start_client(self):
        from jupyter_cache import get_cache
        from jupyter_cache.cache.db import NbCacheRecord

        if self.path is None:  # not a file: nothing of ours to do
            return super().start_client()
        cache_path = Path(self.nb_config.execution_cache_path or ".jupyter_cache")
        jcache = get_cache(str(cache_path))
        sidecars = _Sidecars(cache_path)
        results = Path(os.environ.get("STAMP_RESULTS") or REPO / "data" / "results")
        own = results / f"{self.path.stem}.json"
        _, hashkey = jcache.create_hashed_notebook(self.notebook)
        inputs = summary_inputs(results, self.path) if is_summary(self.path) else None

        record = None
        with suppress(KeyError):
            record = jcache.match_cache_notebook(self.notebook)
        if record is not None:
            side = sidecars.read(hashkey)
            if side is None or side.get("inputs") != inputs:
                _drop_record(jcache, record, sidecars)
                record = None
            else:
                results.mkdir(parents=True, exist_ok=True)
                if side.get("results") is None:
                    own.unlink(missing_ok=True)
                else:
                    own.write_text(side["results"])

        super().start_client()
        self.executed = record is None
        if not self.executed or not (self.exec_metadata or {}).get("succeeded"):
            return
        with suppress(KeyError):
            NbCacheRecord.record_from_hashkey(hashkey, jcache.db)  # stored by the run just made
            sidecars.write(hashkey, {"notebook": self.path.name,
                                     "results": own.read_text() if own.is_file() else None,
                                     "inputs": inputs})
            mine = sorted((r for r in jcache.list_cache_records() if r.uri == str(self.path)),
                          key=lambda r: r.created, reverse=True)
            for old in mine[KEEP_PER_NOTEBOOK:]:
                _drop_record(jcache, old, sidecars)


# ---- the notebook tests' entry point -------------------------------------------------------------

@dataclass
class Outcome:
    """A notebook run through the cache: the executed (or cached) notebook and what happened."""

    notebook: object
    executed: bool
    error: str | None = None        # exception class name; None if it succeeded
    traceback: str | None = None
    log: list[str] = field(default_factory=list)
    glued: frozenset = frozenset()  # glue keys: myst-nb moves glue outputs out of the notebook


class _Log(logging.LoggerAdapter):
    """The logger myst-nb's clients expect (``subtype=`` and ``line=`` keywords), kept in a list."""

    def __init__(self):
        super().__init__(logging.getLogger("nbcache"), {})
        self.lines: list[str] = []

    def process(self, msg, kwargs):
        kwargs.pop("subtype", None)
        kwargs.pop("line", None)
        return msg, kwargs

    def log(self, level, msg, *args, **kwargs):
        self.lines.append(f"{logging.getLevelName(level)}: {msg}")
        super().log(level, msg, *args, **kwargs)


@cache
def _configs(config_yml: Path):
    """(myst-parser config, myst-nb config) that ``jupyter-book build --config config_yml`` uses."""
    import yaml
    from jupyter_book.config import get_final_config
    from myst_nb.core.config import NbParserConfig
    from myst_parser.config.main import MdParserConfig

    user = yaml.safe_load(Path(config_yml).read_text())
    user.get("sphinx", {}).pop("local_extensions", None)  # no sys.path side effects here
    spx, _ = get_final_config(user_yaml=user, cli_config={"latex_individualpages": False}, validate=False)
    md = MdParserConfig(**{n: spx[f"myst_{n}"] for n, _, f in MdParserConfig().as_triple()
                           if "sphinx" not in f.metadata.get("omit", []) and f"myst_{n}" in spx})
    nb = NbParserConfig(**{n: spx[f"nb_{n}"] for n, _, f in NbParserConfig().as_triple()
                           if not f.metadata.get("sphinx_exclude") and f"nb_{n}" in spx})
    return md, nb


@contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def execute(path: Path, srcdir: Path = REPO, config_yml: Path | None = None) -> Outcome:
    """Run the MyST notebook ``path`` as the book build of ``srcdir`` does: same reader, same
    cache folder and key, same client, the ``execute:`` settings of ``config_yml`` (default
    ``<srcdir>/book/_config.yml``). Executes only if the cache has no valid record."""
    from myst_nb.core.read import create_nb_reader
    from nbclient.exceptions import DeadKernelError

    path = Path(path).resolve()
    md, nb_config = _configs(Path(config_yml or Path(srcdir) / "book" / "_config.yml").resolve())
    if nb_config.execution_mode != "cache":
        raise RuntimeError(f"execute_notebooks is {nb_config.execution_mode!r}, not 'cache'")
    folder = Path(nb_config.execution_cache_path) if nb_config.execution_cache_path else cache_dir(srcdir)
    prune(folder)
    nb_config = nb_config.copy(execution_cache_path=str(folder))
    text = path.read_text(encoding="utf8")
    reader = create_nb_reader(str(path), md, nb_config, text)
    if reader is None:
        raise ValueError(f"{path} is not a MyST notebook (no jupytext/kernelspec header)")
    notebook = reader.read(text)
    log = _Log()
    client = KeyedCacheClient(notebook, path, nb_config, log, read_fmt=reader.read_fmt)
    with _env(STAMP_RESULTS=str(results_dir(folder))):
        try:
            with client:
                pass
        except DeadKernelError as exc:
            return Outcome(client.notebook, True, type(exc).__name__, str(exc), log.lines)
    meta = client.exec_metadata or {}
    return Outcome(client.notebook, client.executed, meta.get("error"), meta.get("traceback"), log.lines,
                   frozenset(client.glue_data))


# ---- the Sphinx extension -------------------------------------------------------------------------

def _config_inited(app, config):
    if config.nb_execution_mode != "cache":
        return
    if not config.nb_execution_cache_path:
        config.nb_execution_cache_path = str(cache_dir(Path(app.srcdir)))
    folder = Path(config.nb_execution_cache_path)
    prune(folder)
    os.environ["STAMP_RESULTS"] = str(results_dir(folder))  # the kernels inherit it


def _summaries_outdated(app, env, added, changed, removed):
    """Re-read the summary pages whenever another page is read: their inputs may have changed
    (whether they re-execute is then up to :class:`KeyedCacheClient`)."""
    if not (added | changed | removed):
        return []
    return [d for d in env.found_docs if d.rsplit("/", 1)[-1].startswith(SUMMARY_PREFIX)
            and d not in added | changed]


def setup(app):
    import myst_nb.core.execute as mystnb_execute

    mystnb_execute.NotebookClientCache = KeyedCacheClient  # what create_client instantiates
    app.connect("config-inited", _config_inited, priority=900)
    app.connect("env-get-outdated", _summaries_outdated)
    return {"version": "1", "parallel_read_safe": False, "parallel_write_safe": True}


if __name__ == "__main__":
    print(cache_dir(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO))
