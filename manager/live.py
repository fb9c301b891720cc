"""Live progress for ``apply``: every phase of the workload named as it runs, with its progress and
an ETA where one is known (rich, updating in place on a terminal; plain lines otherwise).

On a terminal each phase is a row that updates in place (a bar where its size is known, the elapsed
time, the ETA counting down between events) and stays, ticked, when it ends. Anywhere else (CI logs,
pipes) a phase prints one line when it starts and one when it ends, training one per logged step, and
never a carriage return. Phases come from the workload's ``phase`` events (``manager.phases``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .phases import NESTED, Phase, PhaseTracker, estimates
from .units import duration

if TYPE_CHECKING:
    from rich.console import Console

    from .clock import Clock
    from .plan import Plan


class LiveReporter:
    """Turns workload events into phase rows (a terminal) or phase lines (anything else).

    ``console``, ``clock`` and ``auto_refresh`` are for tests: a recording console, a ManualClock,
    and no refresh thread (a terminal's rows are then redrawn on every event)."""

    def __init__(self, plan: Plan, *, console: Console | None = None, clock: Clock | None = None,
                 auto_refresh: bool = True) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn

        from .clock import SystemClock

        self.console = console if console is not None else Console(highlight=False)
        self.clock = clock if clock is not None else SystemClock()
        self.plan = plan
        self.tty = self.console.is_terminal
        self.tracker = PhaseTracker(estimates(plan))
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(bar_width=24), TextColumn("{task.fields[position]}"),
            TextColumn("{task.fields[info]}"), _TimeColumn(self.clock),
            console=self.console, transient=False, disable=not self.tty, get_time=self.clock.monotonic,
            auto_refresh=auto_refresh and self.tty,
        )
        self.rows: dict[int, Any] = {}  # Phase.serial -> task
        self._launch: Any = None  # the row opened by "launching attempt N", until the workload speaks
        self.progress.start()

    # ---- rows (terminal) ------------------------------------------------------------------------
    def _row(self, p: Phase) -> Any:
        if p.serial not in self.rows:
            if p.phase == "starting" and self._launch is not None:
                task, self._launch = self._launch, None  # the launch's row, its time included
                self.progress.update(task, description=p.label)
            else:
                task = self.progress.add_task(p.label, total=None, position="", info="", eta=None, eta_at=0.0)
            self.rows[p.serial] = task
        return self.rows[p.serial]

    def _show(self, p: Phase) -> None:
        if p.phase in NESTED and len(self.tracker.open) > 1:
            parent = self.tracker.open[-2]  # a nested phase shows on the row of the phase around it
            self.progress.update(self._row(parent), info=f"{p.label}...")
            return
        task = self._row(p)
        total = p.total if p.total else None
        self.progress.update(task, description=p.label, total=total, completed=p.done or 0,
                             position=p.position(), eta=p.eta, eta_at=self.clock.monotonic())

    def _end(self, p: Phase) -> None:
        wall = p.fields.get("wall_s")
        took = f"done in {duration(wall, tenths=True)}" if isinstance(wall, (int, float)) else "done"
        if self.tty:
            if p.phase in NESTED and self.tracker.open:
                self.progress.update(self._row(self.tracker.open[-1]), info="")
                return
            task = self._row(p)
            total = next((t.total for t in self.progress.tasks if t.id == task), None) or 1
            self.progress.update(task, description=f"[green]\u2713[/green] {p.label}", total=total, completed=total,
                                 position="", info=took, eta=None)
            self.progress.stop_task(task)
        elif not p.fields.get("implied"):  # an implied step's end is its step_done line
            self.console.print(f"{'  ' if p.phase in NESTED else ''}{p.label} {took}")

    # ---- the controller's calls -----------------------------------------------------------------
    def status(self, message: str) -> None:
        self.progress.console.print(f"[dim]{message}[/dim]")
        if self.tty and message.startswith("launching attempt"):
            self._interrupt()
            if self._launch is None:
                self._launch = self.progress.add_task(f"starting: {message}", total=None, position="", info="",
                                                      eta=None, eta_at=0.0)
            else:
                self.progress.update(self._launch, description=f"starting: {message}")

    def _interrupt(self, info: str = "interrupted") -> None:
        """Rows of phases that will never end (their attempt is gone) stop counting."""
        for task in self.progress.tasks:
            if not task.finished and task.stop_time is None and task.id != self._launch:
                self.progress.update(task.id, info=info, eta=None)
                self.progress.stop_task(task.id)

    def event(self, e: dict[str, Any]) -> None:
        changed = self.tracker.feed(e)
        kind, index = e.get("event"), e.get("index", -1)
        step_kind = e.get("kind", "")
        if changed is not None:
            what, p = changed
            if what == "end":
                self._end(p)
            elif self.tty:
                if what == "start" and p.phase not in NESTED:
                    self._interrupt()  # a phase left open by an attempt that ended (a preemption)
                self._show(p)
            elif what == "start":  # one line as a phase starts; its updates stay off a pipe
                planned = f" (plan: ~{duration(p.eta.seconds)} with its evaluation)" if p.eta and p.eta.planned \
                    else ""
                self.console.print(f"{'  ' if p.phase in NESTED else ''}{p.label}{planned}")
        if kind == "progress":
            if not self.tty:
                loss, tps = e.get("loss"), e.get("tokens_per_s")
                info = (f"loss {loss:.3f}" if isinstance(loss, (int, float)) else "loss -") + (
                    f"  {tps:,.0f} tok/s" if isinstance(tps, (int, float)) else "")
                eta = changed[1].eta if changed and changed[1].eta else None
                self.console.print(f"  {index}:{step_kind} step {e.get('step')}/{e.get('max_steps')} {info}"
                                   + (f"  {eta.text()}" if eta else ""))
            elif changed is not None:
                loss, tps = e.get("loss"), e.get("tokens_per_s")
                info = (f"loss {loss:.3f}" if isinstance(loss, (int, float)) else "loss -") + (
                    f"  {tps:,.0f} tok/s" if isinstance(tps, (int, float)) else "")
                self.progress.update(self._row(changed[1]), info=info)
        elif kind == "metrics":
            m = e.get("metrics") or {}
            shown = ", ".join(f"{k} {v:.4g}" for k, v in m.items() if isinstance(v, (int, float)))
            self.progress.console.print(f"  {index}:{step_kind} {shown}")
        elif kind == "trial":
            self.progress.console.print(f"  {trial_text(e)}")
        elif kind == "step_done":
            # The step's wall time includes the evaluation of its output: what the step cost.
            if e.get("skipped"):
                self.progress.console.print(f"  {index}:{step_kind} already done: reused")
            else:
                self.progress.console.print(f"  {index}:{step_kind} done in {e.get('wall_s', 0):.1f}s")
            if step_kind == "hpo" and (best := hpo_best_text(e, self.plan)):
                self.progress.console.print(f"  {best}")
        elif kind == "stopped":
            self.progress.console.print(f"[yellow]stopped ({e.get('reason')}) at step {e.get('step')}[/yellow]")
        elif kind == "error":
            self.progress.console.print(f"[red]workload error: {e.get('message')}[/red]")
        if self.tty and kind in ("stopped", "error", "job_done"):
            self._interrupt({"stopped": "stopped", "error": "failed"}.get(str(kind), ""))
        if self.tty:
            self.progress.refresh()

    def close(self) -> None:
        self.progress.stop()


class _TimeColumn:
    """A running row's elapsed time and its ETA, counting down between the events that set it
    (``manager.phases.Eta``); nothing once the row is done (its info says how long it took)."""

    def __new__(cls, clock: Clock) -> Any:
        from rich.progress import ProgressColumn
        from rich.text import Text

        class TimeColumn(ProgressColumn):
            def render(self, task: Any) -> Text:
                if task.finished or not task.started or task.stop_time is not None:
                    return Text("")
                text = Text(duration(task.elapsed or 0.0), style="yellow")
                eta = task.fields.get("eta")
                if eta is not None:
                    text.append("  " + eta.text(clock.monotonic() - task.fields.get("eta_at", 0.0)), style="cyan")
                return text

        return TimeColumn()


def num(v: Any) -> str:
    """A number as a person reads it: 4 significant digits (``0.008459``, ``5.393``), ints whole."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return str(v) if isinstance(v, int) else f"{v:.4g}"


def trial_text(e: dict[str, Any]) -> str:
    """``trial 2: 5.393 (train.lr=0.008459, train.batch_size=16) complete``."""
    value = e.get("value")
    params = ", ".join(f"{k}={num(v)}" for k, v in (e.get("params") or {}).items())
    shown = num(value) if isinstance(value, (int, float)) else "-"
    return f"trial {e.get('number')}: {shown}" + (f" ({params})" if params else "") + \
        (f" {e.get('state')}" if e.get("state") else "")


def hpo_best_text(e: dict[str, Any], plan: Plan | None = None) -> str | None:
    """What an hpo step's ``step_done`` hands on: ``best trial 3 (eval_loss 5.101): step 1:train
    uses train.lr=0.008459``. The best values are its metrics ``best.KEY``."""
    m = e.get("metrics") or {}
    best = {k[len("best."):]: v for k, v in m.items() if isinstance(k, str) and k.startswith("best.")}
    if not best:
        return None
    index = e.get("index")
    target = None
    if plan is not None and isinstance(index, int):
        target = next((s for s in plan.steps if s.index > index and s.kind != "evaluate"), None)
    head = f"{index}:hpo best trial {m.get('best_trial', '?')}"
    if isinstance(m.get("best_value"), (int, float)):
        head += f" ({m.get('metric') or 'value'} {num(m['best_value'])})"
    uses = ", ".join(f"{k}={num(v)}" for k, v in best.items())
    return f"{head}: " + (f"step {target.index}:{target.kind} uses {uses}" if target else f"uses {uses}")
