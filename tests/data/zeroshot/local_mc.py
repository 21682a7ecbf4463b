"""The dataset of the local task ``stamp_local_mc`` (``local_mc.yaml``): ``local_mc.jsonl`` next to
this file, read without the Hugging Face Hub or any cache (lm-eval's ``custom_dataset`` hook)."""

from __future__ import annotations

import json
from pathlib import Path

JSONL = Path(__file__).with_name("local_mc.jsonl")


def load(**_metadata):
    """``DatasetDict({"test": ...})`` of the JSONL rows (``id``, ``question``, ``choices``, ``answer``);
    lm-eval passes the task's metadata as keywords, unused here."""
    import datasets

    rows = [json.loads(line) for line in JSONL.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
