"""Offline datasets of the tiny lm-eval tasks: read from the JSONL files next to this file."""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).parent


def _load(name: str, **kwargs) -> datasets.DatasetDict:
    rows = [json.loads(line) for line in (HERE / name).read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def multiple_choice(**kwargs) -> datasets.DatasetDict:
    return _load("braid_tiny_mc.jsonl")


def text(**kwargs) -> datasets.DatasetDict:
    return _load("braid_tiny_text.jsonl")
