"""Run the ``optjob`` CLI in a subprocess, optionally with the stand-in workload.

``python driver.py ARGS...`` is ``optjob ARGS...``; when ``OPTJOB_TEST_STANDIN`` names an
executable, the local provider runs it instead of the real workload (see
tests/providers/standin.py), so controller-level faults are exercised through the real
CLI without torch. Used by the reliability tests and ``benchmarks/reliability.py``.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    standin = os.environ.get("OPTJOB_TEST_STANDIN")
    if standin:
        import optjob.manager.commands.common as commands
        from optjob.providers.local import LocalProvider

        real = commands.provider_for
        commands.provider_for = lambda name: LocalProvider(python=standin) if name == "local" else real(name)
    from optjob.manager.cli import main as cli_main

    cli_main(sys.argv[1:])


if __name__ == "__main__":
    main()
