"""The deadline as a hard stop: a phase that never checks the stop flag still ends at the deadline."""

from __future__ import annotations

import json
import subprocess
import sys

from optjob.steps import watchdog
from optjob.steps.exit_codes import EXIT_DEADLINE


def test_no_deadline_no_watchdog() -> None:
    assert watchdog.arm(None, lambda: None) is None


def test_it_fires_at_the_deadline_and_exits_with_the_deadline_code() -> None:
    now = [100.0]
    fired: list[str] = []
    exits: list[int] = []

    def sleep(s: float) -> None:
        now[0] += s

    dog = watchdog.arm(103.5, lambda: fired.append("stopped"), clock=lambda: now[0], sleep=sleep,
                       exit_now=exits.append)
    assert dog is not None
    dog.thread.join(10)
    assert fired == ["stopped"] and exits == [EXIT_DEADLINE] and now[0] >= 103.5


def test_a_disarmed_watchdog_never_fires() -> None:
    exits: list[int] = []
    dog = watchdog.arm(0.0 + 1e12, lambda: None, exit_now=exits.append, sleep=lambda s: None)
    assert dog is not None
    dog.disarm()
    dog.thread.join(10)
    assert not dog.thread.is_alive() and exits == []


def test_a_process_stuck_in_a_phase_that_never_checks_ends_at_its_deadline() -> None:
    """A real process sleeping in its main thread (as a long generate or a blocking read would)."""
    code = (
        "import time, json\n"
        "from optjob.steps import watchdog\n"
        "from optjob.steps.events import Emitter\n"
        "e = Emitter()\n"
        "watchdog.arm(time.time() + 0.5, lambda: e.emit('stopped', index=1, reason='deadline-hard', step=None))\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_DEADLINE
    event = json.loads(proc.stdout.strip().splitlines()[-1])
    assert event["event"] == "stopped" and event["reason"] == "deadline-hard"


def test_the_stop_flag_keeps_room_for_one_step_and_one_checkpoint_not_a_fixed_20s() -> None:
    """So a stop spends the budget: the deadline trips with room for the step under way and a
    checkpoint (measured), not 20 s early; the first (warm-up) step does not count once others ran."""
    import time

    from optjob.steps.context import StopFlag

    flag = StopFlag(deadline=time.time() + 5.0, margin=0.5)
    flag.observe(10.0)  # the first step: warm-up
    for _ in range(3):
        flag.observe(0.1)
    flag.observe(0.2, checkpoint=True)
    assert flag.reason() is None  # 0.5 + 0.1 + 0.2 s of room needed, 5 s left
    assert StopFlag(deadline=time.time() + 0.4, margin=0.5).reason() == "deadline"
