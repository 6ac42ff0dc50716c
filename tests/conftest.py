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
if os.getloadavg()[0] > (os.cpu_count() or 1) + 1:  # a busy CPU: see analysis._openmp_wait_policy
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    path = Path(os.environ["DEEPVRM_LENS_CACHE"])
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def embedded_default():
    """The embedded default, built once per cache: forensic-mini (default preset) and the pretrained mini-VL.

    Cold, this is the longest step of the suite (data + pretraining: minutes); warm, it reads two reports.
    """
    from probes.backbones.pretrain import PretrainConfig, pretrain_mini_vl
    from probes.data import ForensicMiniConfig, build_forensic_mini

    data = build_forensic_mini(ForensicMiniConfig.preset("default"))
    report = pretrain_mini_vl(PretrainConfig(), data.path, progress=False)
    return data, report
