"""Live progress for ``apply``: a bar per step, loss and tokens/s (rich)."""

from __future__ import annotations

from typing import Any

from .plan import Plan


class LiveReporter:
    """Turns workload events into progress bars. Falls back to plain lines when not a terminal."""

    def __init__(self, plan: Plan) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(highlight=False)
        self.plan = plan
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=self.console, transient=False,
            disable=not self.console.is_terminal,
        )
        self.tasks: dict[int, Any] = {}
        self.progress.start()

    def _task(self, index: int, kind: str, total: int | None = None) -> Any:
        if index not in self.tasks:
            self.tasks[index] = self.progress.add_task(f"{index}:{kind}", total=total or 1, info="")
        return self.tasks[index]

    def status(self, message: str) -> None:
        self.progress.console.print(f"[dim]{message}[/dim]")

    def event(self, e: dict[str, Any]) -> None:
        kind, index = e.get("event"), e.get("index", -1)
        step_kind = e.get("kind", "")
        if kind == "step_started":
            self._task(index, step_kind)
        elif kind == "progress":
            task = self._task(index, step_kind, e.get("max_steps"))
            loss, tps = e.get("loss"), e.get("tokens_per_s")
            info = (f"loss {loss:.3f}" if isinstance(loss, (int, float)) else "loss -") + (
                f"  {tps:,.0f} tok/s" if isinstance(tps, (int, float)) else "")
            self.progress.update(task, completed=e.get("step", 0), total=e.get("max_steps") or 1, info=info)
            if not self.console.is_terminal:
                self.console.print(f"  {index}:{step_kind} step {e.get('step')}/{e.get('max_steps')} {info}")
        elif kind == "metrics":
            m = e.get("metrics") or {}
            shown = ", ".join(f"{k} {v:.4g}" for k, v in m.items() if isinstance(v, (int, float)))
            self.progress.console.print(f"  {index}:{step_kind} {shown}")
        elif kind == "trial":
            self.progress.console.print(f"  {trial_text(e)}")
        elif kind == "step_done":
            task = self._task(index, step_kind)
            total = self.progress.tasks[task].total or 1
            self.progress.update(task, completed=total, info=f"done in {e.get('wall_s', 0):.1f}s"
                                 + (" (skipped, already done)" if e.get("skipped") else ""))
            if not self.console.is_terminal:
                self.console.print(f"  {index}:{step_kind} done in {e.get('wall_s', 0):.1f}s")
            if step_kind == "hpo" and (best := hpo_best_text(e, self.plan)):
                self.progress.console.print(f"  {best}")
        elif kind == "stopped":
            self.progress.console.print(f"[yellow]stopped ({e.get('reason')}) at step {e.get('step')}[/yellow]")
        elif kind == "error":
            self.progress.console.print(f"[red]workload error: {e.get('message')}[/red]")

    def close(self) -> None:
        self.progress.stop()


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
