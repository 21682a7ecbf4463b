"""Test-session environment, set before any test module (or notebook kernel) starts.

* ``HF_HUB_OFFLINE=1`` (and the transformers/datasets twins): nothing is ever downloaded.
* ``STUDY_SIZE`` defaults to ``small``; ``STUDY_SIZE=full pytest`` is passed through unchanged, and
  notebook kernels inherit it (they are child processes of pytest).
* ``JUPYTER_PATH`` starts with this interpreter's ``share/jupyter``, so the kernel named
  ``python3`` in the notebooks is this venv's ipykernel even if the user installed another one.

Hypothesis runs derandomized (profile ``deterministic``): ``make test`` draws the same examples on
every machine, so a clean clone passes or fails the same way (a random draw once failed CI on an
input nobody had tried). ``make fuzz`` (profile ``explore``: fresh random draws each run) searches
for new counterexamples; one it finds is printed with its ``@reproduce_failure`` blob, to be
pinned as an explicit test.

Under pytest-xdist (``make test`` runs ``pytest -n 2 --dist loadfile --no-loadscope-reorder``)
each test file runs on one worker. Every test that executes a notebook (marker ``notebook``) lives
in ``tests/test_notebooks.py`` (checked at collection), which is moved to the front: one worker
runs the notebooks one kernel at a time, in order (``99_claims`` after the chapters), from the
start of the session, while the other workers take the other files. (``--dist loadgroup`` with
``xdist_group`` marks would be the natural tool, but pytest-xdist 3.8 cannot rename the node ids
of pytest 9, so its groups are silently ignored.)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("STUDY_SIZE", "small")
os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # quiet kernel start on 3.11

_share = str(Path(sys.prefix) / "share" / "jupyter")
_paths = [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p and p != _share]
os.environ["JUPYTER_PATH"] = os.pathsep.join([_share, *_paths])

REPO_ROOT = Path(__file__).resolve().parents[1]


import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("deterministic", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

NOTEBOOK_TESTS = "test_notebooks.py"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under xdist a notebook kernel (its own process, default threads) runs beside the unit tests:
    # one torch thread here keeps the two from oversubscribing the cores.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    stray = [i.nodeid for i in items if i.get_closest_marker("notebook") and i.path.name != NOTEBOOK_TESTS]
    if stray:
        raise pytest.UsageError(f"tests marked `notebook` must live in tests/{NOTEBOOK_TESTS} (one xdist worker "
                                f"runs them, one kernel at a time): move {stray}")
    items.sort(key=lambda i: i.path.name != NOTEBOOK_TESTS)  # stable: the file's own order is kept


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: on a shared 2-core machine two threads can run ten times
    slower (oversubscription); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
