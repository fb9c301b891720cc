"""How the workload process ends: the exit codes it promises (a stdlib-only contract, read by the
providers and the manager).

0 success; 1 a step failed; 2 a bad job file; 4 stopped at the budget deadline (a checkpoint was
written); 143 stopped by SIGTERM (a checkpoint was written). 137 is not the workload's own: it is
what a SIGKILL from outside (a preemption, the OOM killer) leaves.
"""

from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_BAD_JOB, EXIT_DEADLINE, EXIT_SIGNAL = 0, 1, 2, 4, 143
#: A graceful stop: at the deadline, or on request.
STOP_CODES = (EXIT_DEADLINE, EXIT_SIGNAL)
#: Killed from outside (SIGKILL: 137 = 128 + 9; -9 as Python's subprocess reports it).
KILLED_CODES = (137, -9)
