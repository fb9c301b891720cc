"""Issue 13, item 9: a spec path that is not a regular file (a FIFO, /dev/zero, /dev/urandom) is
refused before a byte is read, with one line and exit 2, instead of hanging or reading until
MemoryError. Every read runs in a subprocess with a timeout, so a regression fails the test
rather than hanging the suite."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GOOD = "name: tiny\nmodel: {init: {layers: 2, hidden: 64, heads: 2, vocab: 512}}\nsteps: [{train: {}}]\n"
#: Seconds a refused read may take at most; a FIFO or /dev/zero read never ends on its own.
GUARD_S = 20
#: Address space of each child: a regression reading /dev/zero hits MemoryError here, not the machine.
CHILD_MEMORY = 4 * 2**30


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY, CHILD_MEMORY))


def run(args: list[str], timeout: float = GUARD_S, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, preexec_fn=_limit_memory,
                          **kwargs)  # type: ignore[call-overload]


def validate(path: Path | str, home: Path) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "optjob.manager.cli", "validate", str(path)], cwd=ROOT,
               env={**os.environ, "OPTJOB_HOME": str(home)})


def load_in_subprocess(path: Path | str) -> subprocess.CompletedProcess[str]:
    """``load_spec(path)`` in a child: prints the one error line, exits with its exit code."""
    code = (
        "import sys\n"
        "from optjob.specs import SpecError, load_spec\n"
        "try:\n"
        "    load_spec(sys.argv[1])\n"
        "except SpecError as exc:\n"
        "    print(exc, file=sys.stderr)\n"
        "    sys.exit(exc.exit_code)\n"
    )
    return run([sys.executable, "-c", code, str(path)])


def one_line_exit_2(proc: subprocess.CompletedProcess[str], path: Path | str, words: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(path) in lines[0] and words in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    path = tmp_path / "spec.yaml"
    os.mkfifo(path)
    return path


def test_fifo_is_refused_by_validate(fifo: Path, tmp_path: Path):
    one_line_exit_2(validate(fifo, tmp_path / "home"), fifo, "FIFO")


def test_fifo_is_refused_by_the_loader(fifo: Path):
    one_line_exit_2(load_in_subprocess(fifo), fifo, "not a regular file")


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_endless_devices_are_refused(device: str, tmp_path: Path):
    if not os.path.exists(device):
        pytest.skip(f"no {device} here")
    one_line_exit_2(validate(device, tmp_path / "home"), device, "character device")
    one_line_exit_2(load_in_subprocess(device), device, "not a regular file")


def test_a_symlink_to_a_device_is_refused(tmp_path: Path):
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero here")
    link = tmp_path / "spec.yaml"
    link.symlink_to("/dev/zero")
    one_line_exit_2(load_in_subprocess(link), link, "not a regular file")


def test_regular_files_and_symlinks_to_them_still_load(tmp_path: Path):
    from optjob.specs import load_spec

    real = tmp_path / "real.yaml"
    real.write_text(GOOD)
    link = tmp_path / "link.yaml"
    link.symlink_to(real)
    assert load_spec(real).name == load_spec(link).name == "tiny"
    proc = validate(link, tmp_path / "home")
    assert proc.returncode == 0 and "ok:" in proc.stdout, proc.stderr


def test_a_data_file_that_is_a_fifo_is_a_step_error(fifo: Path):
    """The node reads data.source too: a FIFO there is one clear StepError, not a hung workload."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from optjob.specs.data import DataSpec\n"
        "from optjob.specs.errors import StepError\n"
        "from optjob.steps.data import load_text\n"
        "try:\n"
        "    load_text(DataSpec(source=sys.argv[1]), Path(sys.argv[2]))\n"
        "except StepError as exc:\n"
        "    print(exc, file=sys.stderr)\n"
        "    sys.exit(7)\n"
    )
    # Longer: the child imports torch (steps.data), seconds on a busy machine.
    proc = run([sys.executable, "-c", code, str(fifo), str(fifo.parent / "cache")], timeout=120)
    assert proc.returncode == 7, proc.stderr
    assert "not a regular file" in proc.stderr
