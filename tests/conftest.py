"""Suite-wide settings: the network is off (fail fast, never hang on a hub download),
tiny models run on one thread, and every test shares one corpus/tokenizer cache."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Where ``make emulators`` installs Azurite (npm ci in tests/emulators); OPTJOB_AZURITE names another azurite-blob.
AZURITE = ROOT / "tests" / "emulators" / "node_modules" / ".bin" / "azurite-blob"
#: Azurite's well-known development account (public, documented by Microsoft; not a secret).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def gcs_endpoint() -> Iterator[str]:
    """gcp-storage-emulator (PyPI, test-only) in a thread on a free port of 127.0.0.1, in memory:
    google-cloud-storage talks to it over real HTTP (``STORAGE_EMULATOR_HOST``)."""
    server_mod = pytest.importorskip("gcp_storage_emulator.server", reason="needs gcp-storage-emulator (dev extra)")
    port = _free_port()
    server = server_mod.create_server("127.0.0.1", port, in_memory=True)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def azurite_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Azurite's blob service (npm, installed by ``make emulators`` into tests/emulators/) as a child process on a
    free port of 127.0.0.1, in memory. Its endpoint, ``http://127.0.0.1:PORT/devstoreaccount1``. Without
    Azurite the Azure tests are skipped, except in CI (``CI`` set), where that is a failure."""
    exe = os.environ.get("OPTJOB_AZURITE") or (str(AZURITE) if AZURITE.exists() else shutil.which("azurite-blob"))
    if not exe or not shutil.which("node"):
        if os.environ.get("CI"):
            pytest.fail("Azurite is not installed: `make emulators` (npm ci in tests/emulators/)")
        pytest.skip("Azurite is not installed: run `make emulators` (needs node and npm)")
    port = _free_port()
    log = tmp_path_factory.mktemp("azurite") / "azurite.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([exe, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence",
                                 "--skipApiVersionCheck", "--disableProductStyleUrl", "--silent"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for _ in range(600):  # readiness, not timing: up to a minute for node to start
            if proc.poll() is not None:
                pytest.fail(f"Azurite exited with {proc.returncode}: {log.read_text()[-2000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        else:
            pytest.fail(f"Azurite did not listen on 127.0.0.1:{port}: {log.read_text()[-2000:]}")
        yield f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def azurite_connection_string(azurite_endpoint: str) -> str:
    """The connection string of Azurite's development account (what AZURE_STORAGE_CONNECTION_STRING holds)."""
    return (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint={azurite_endpoint};")


@pytest.fixture(scope="session", autouse=True)
def _shared_optjob_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Workloads started by tests (subprocesses too) build the builtin corpus once."""
    os.environ["OPTJOB_CACHE"] = str(tmp_path_factory.mktemp("optjob-cache-all"))
