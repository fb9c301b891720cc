"""Suite-wide settings: the network is off (fail fast, never hang on a hub download),
tiny models run on one thread, and every test shares one corpus/tokenizer cache."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _shared_optjob_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Workloads started by tests (subprocesses too) build the builtin corpus once."""
    os.environ["OPTJOB_CACHE"] = str(tmp_path_factory.mktemp("optjob-cache-all"))
