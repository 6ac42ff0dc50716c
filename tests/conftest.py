"""Shared fixtures.

Generated artifacts (the embedded data set, the pretrained backbone, activation caches) are built
once per cache folder and reused by every test of the run (and by later runs on the same machine).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DEEPVRM_LENS_CACHE", str(REPO / ".cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported: see analysis.py


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    path = Path(os.environ["DEEPVRM_LENS_CACHE"])
    path.mkdir(parents=True, exist_ok=True)
    return path
