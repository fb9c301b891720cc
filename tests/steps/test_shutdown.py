"""The workload's fast exit (steps/shutdown.py) keeps what interpreter teardown would have done."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent("""
    import atexit, sys, threading, time
    from pathlib import Path
    from optjob.steps.shutdown import exit_now

    out = Path(sys.argv[1])
    def late():
        time.sleep(0.3)
        (out / "thread").write_text("joined")
    threading.Thread(target=late).start()  # non-daemon: teardown would wait for it
    atexit.register(lambda: (out / "atexit").write_text("ran"))
    sys.stdout.write("buffered, no newline")  # a pipe: block-buffered until flushed
    sys.stderr.write("err tail")
    exit_now(3)
    (out / "after").write_text("never")
""")


def test_exit_now_joins_threads_runs_atexit_flushes_and_keeps_the_code(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3
    assert proc.stdout == "buffered, no newline" and proc.stderr.endswith("err tail")
    assert (tmp_path / "thread").read_text() == "joined"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert not (tmp_path / "after").exists()
