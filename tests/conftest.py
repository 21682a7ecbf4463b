"""Test-session environment, set before any test module (or notebook kernel) starts.

* ``HF_HUB_OFFLINE=1`` (and the transformers/datasets twins): nothing is ever downloaded.
* ``STUDY_SIZE`` defaults to ``small``; ``STUDY_SIZE=full pytest`` is passed through unchanged, and
  notebook kernels inherit it (they are child processes of pytest).
* ``JUPYTER_PATH`` starts with this interpreter's ``share/jupyter``, so the kernel named
  ``python3`` in the notebooks is this venv's ipykernel even if the user installed another one.
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


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: on a shared 2-core machine two threads can run ten times
    slower (oversubscription); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
