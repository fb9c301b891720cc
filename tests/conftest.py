"""Suite-wide settings: the network is off (fail fast, never hang on a hub download),
tiny models run on one thread, and every test shares one corpus/tokenizer cache."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's server mode (S3, EC2, ...) in a thread on a free port of 127.0.0.1: boto3 talks
    to it over real HTTP. Started once for the suite."""
    from moto import server as moto_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session", autouse=True)
def _shared_optjob_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Workloads started by tests (subprocesses too) build the builtin corpus once."""
    os.environ["OPTJOB_CACHE"] = str(tmp_path_factory.mktemp("optjob-cache-all"))
