"""What the workload is doing now, read from its events: the phase named as a person reads it, its
progress, and an ETA where one is known. Shared by the live console (``live.py``) and ``status``.

The workload's ``phase`` events (``steps.phases``) open and close phases; ``progress`` events move a
training step's phase. An ETA comes from what was measured (optimizer steps or evaluation batches per
second, from the events' own timestamps) or else from the plan's estimate for that step (``~``).
No clock is read here: the caller says how long ago the ETA was computed (``remaining``)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .units import duration

if TYPE_CHECKING:
    from .plan import Plan

VERBS = {"train": "training", "distill": "distilling", "prune": "pruning", "quantize": "quantizing",
         "hpo": "searching hyperparameters", "evaluate": "evaluating"}
#: Phases that nest inside another (the console keeps the one around them on screen).
NESTED = frozenset({"checkpoint", "upload", "pull", "reload"})


def phase_label(e: dict[str, Any]) -> str:
    """``preparing data``, ``step 0 train: training``, ``evaluating step 0 (train)``..."""
    phase, i, kind = e.get("phase"), e.get("index"), e.get("kind")
    step = f"step {i} ({kind})" if i is not None else "the model"
    if e.get("variant"):
        step = f"{step} of variant {e['variant']}"
    if phase == "step":
        return f"step {i} {kind}{' of variant ' + str(e['variant']) if e.get('variant') else ''}: " \
               f"{VERBS.get(str(kind), 'running')}"
    if phase == "step_eval":
        return f"evaluating {step}"
    if phase == "checkpoint":
        return f"checkpointing {step}" + (f" at step {e['step']}" if e.get("step") is not None else "")
    if phase == "reload":
        return f"reloading {step}'s output"
    return {"starting": "starting", "pull": "pulling from storage", "data": "preparing data",
            "baseline": "baseline evaluation", "final": "final evaluation",
            "upload": "uploading to storage"}.get(str(phase), str(phase))


@dataclass
class Eta:
    """``seconds`` left when computed; ``planned``: the plan's estimate, not a measurement."""

    seconds: float
    planned: bool = False

    def text(self, elapsed: float = 0.0) -> str:
        left = self.seconds - elapsed
        if self.planned:
            return f"ETA ~{duration(max(left, 0.0))} (plan)" if left > 0 else "past the plan's estimate"
        return f"ETA {duration(max(left, 0.0))}"


@dataclass
class Phase:
    """One open phase: its event fields and where it stands."""

    phase: str
    index: int | None = None
    kind: str | None = None
    started_ts: float | None = None
    done: int | None = None
    total: int | None = None
    unit: str | None = None
    detail: str | None = None
    eta: Eta | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    #: (ts, step) of the first progress event seen in this phase: the reference for the step rate.
    first_progress: tuple[float, int] | None = None
    #: The timestamp of the latest event that moved it (the ETA was computed then).
    last_ts: float | None = None
    #: Tells phases apart (the console's rows) for as long as the process lives.
    serial: int = field(default_factory=itertools.count().__next__)

    @property
    def label(self) -> str:
        return phase_label({**self.fields, "phase": self.phase, "index": self.index, "kind": self.kind})

    def position(self) -> str:
        """``40/100 steps``, ``3/19 batches``, or the detail (``timing latency``)."""
        if self.detail:
            return self.detail
        if self.done is not None and self.total:
            return f"{self.done}/{self.total}" + (f" {self.unit}" if self.unit else "")
        return ""

    def text(self, elapsed: float = 0.0) -> str:
        """The phase as one line: label, position and ETA."""
        parts = [self.label, self.position(), self.eta.text(elapsed) if self.eta else ""]
        return "  ".join(p for p in parts if p)

    def short(self, elapsed: float = 0.0) -> str:
        """The phase in a table cell: ``0:train training 40/100 ETA 52s``, ``baseline eval 3/19``."""
        where = f"{self.index}:{self.kind}"
        name = {"step": f"{where} {VERBS.get(str(self.kind), 'running').split()[0]}", "step_eval": f"eval {where}",
                "checkpoint": f"checkpoint {where}", "reload": f"reload {where}", "baseline": "baseline eval",
                "final": "final eval", "data": "preparing data", "pull": "pulling", "upload": "uploading",
                }.get(self.phase, self.phase)
        at = f"{self.done}/{self.total}" if self.done is not None and self.total else ""
        left = ""
        if self.eta is not None:
            rest = self.eta.seconds - elapsed
            left = f"ETA {'~' if self.eta.planned else ''}{duration(rest)}" if rest > 0 else ""
        return " ".join(x for x in (name, at, left) if x)

    def to_json(self, elapsed: float = 0.0) -> dict[str, Any]:
        eta = None if self.eta is None else max(0.0, round(self.eta.seconds - elapsed, 1))
        return {"phase": self.phase, "label": self.label, "index": self.index, "kind": self.kind, "done": self.done,
                "total": self.total, "unit": self.unit, "eta_s": eta,
                "eta_from": None if self.eta is None else ("plan" if self.eta.planned else "measured")}


class PhaseTracker:
    """Replays events into the stack of open phases (``current`` is the innermost)."""

    def __init__(self, estimates: dict[int, float] | None = None) -> None:
        self.estimates = estimates or {}
        self.open: list[Phase] = []

    @property
    def current(self) -> Phase | None:
        return self.open[-1] if self.open else None

    def planned_seconds(self, index: int | None) -> float | None:
        return self.estimates.get(index) if index is not None else None

    def feed(self, e: dict[str, Any]) -> tuple[str, Phase] | None:
        """Take one event; ``("start"|"update"|"end", phase)`` when it changed a phase."""
        changed = self._feed(e)
        if changed is not None and isinstance(e.get("ts"), (int, float)):
            changed[1].last_ts = float(e["ts"])
        return changed

    def _feed(self, e: dict[str, Any]) -> tuple[str, Phase] | None:
        kind = e.get("event")
        if kind == "phase":
            return self._phase(e)
        if kind == "progress":
            return self._progress(e)
        if kind == "step_done":  # ends a step phase the events never opened (see _progress)
            p = next((p for p in self.open if p.phase == "step" and p.fields.get("implied")
                      and p.index == e.get("index") and p.fields.get("variant") == e.get("variant")), None)
            if p is not None:
                self.open.remove(p)
                p.fields["wall_s"] = e.get("wall_s")
                return "end", p
            return None
        if kind in ("stopped", "error", "job_done"):
            self.open.clear()
        return None

    def _phase(self, e: dict[str, Any]) -> tuple[str, Phase] | None:
        name, state, ts = str(e.get("phase")), e.get("state"), e.get("ts")
        if state == "start":
            if name not in NESTED:
                self.open.clear()  # a top-level phase follows whatever was open
            new = Phase(name, e.get("index"), e.get("kind"), ts if isinstance(ts, (int, float)) else None,
                        fields={k: v for k, v in e.items() if k in ("step", "variant")})
            planned = self.planned_seconds(new.index) if name == "step" else None
            new.eta = Eta(planned, planned=True) if planned else None
            self.open.append(new)
            return "start", new
        found = next((p for p in reversed(self.open) if p.phase == name), None)
        if found is None:
            return None
        p = found
        if state == "end":
            self.open.remove(p)
            p.fields["wall_s"] = e.get("wall_s")
            return "end", p
        done, total = e.get("done"), e.get("total")
        p.detail = e.get("detail") if isinstance(e.get("detail"), str) else None
        if p.unit in ("steps", "trials") and e.get("unit") == "batches":  # a training step's periodic evaluation
            if isinstance(done, int) and isinstance(total, int) and done < total:
                p.detail = f"evaluating {done}/{total} batches"
            return "update", p
        if isinstance(done, int) and isinstance(total, int) and total > 0:
            p.done, p.total, p.unit = done, total, e.get("unit") or p.unit
            if isinstance(ts, (int, float)) and p.started_ts is not None and ts > p.started_ts and done > 0:
                rate = done / (ts - p.started_ts)
                p.eta = Eta((total - done) / rate)
        return "update", p

    def _progress(self, e: dict[str, Any]) -> tuple[str, Phase] | None:
        index, variant, ts = e.get("index"), e.get("variant"), e.get("ts")
        p = next((p for p in reversed(self.open)
                  if p.phase == "step" and p.index == index and p.fields.get("variant") == variant), None)
        what = "update"
        if p is None:  # a workload that names no phases (an older node; a compare variant's steps): implied
            p = Phase("step", index, e.get("kind"), ts if isinstance(ts, (int, float)) else None,
                      fields={"implied": True, **({"variant": variant} if variant else {})})
            self.open.clear()
            self.open.append(p)
            what = "start"
        step, total = e.get("step"), e.get("max_steps")
        if isinstance(step, int) and isinstance(total, int):
            p.done, p.total, p.unit, p.detail = step, total, "trials" if e.get("kind") == "hpo" else "steps", None
            p.eta = self._measured_eta(p, step, total, ts, e) or p.eta
        return what, p

    @staticmethod
    def _measured_eta(p: Phase, step: int, total: int, ts: Any, e: dict[str, Any]) -> Eta | None:
        if isinstance(ts, (int, float)):
            if p.first_progress is None:
                p.first_progress = (float(ts), step)
            else:
                t0, s0 = p.first_progress
                if ts > t0 and step > s0:
                    return Eta((total - step) * (ts - t0) / (step - s0))
        tps, tokens = e.get("tokens_per_s"), e.get("tokens")
        if isinstance(tps, (int, float)) and tps > 0 and isinstance(tokens, (int, float)) and step > 0:
            return Eta((total - step) * (tokens / step) / tps)
        return None


def estimates(plan: Plan | dict[str, Any] | None) -> dict[int, float]:
    """Each step's estimated seconds (its evaluation included) from a plan or its stored JSON."""
    if plan is None:
        return {}
    steps = (plan.get("steps") or []) if isinstance(plan, dict) else [vars(s) for s in plan.steps]
    out: dict[int, float] = {}
    for s in steps:
        if isinstance(s, dict) and isinstance(s.get("index"), int):
            est = s.get("est_seconds")
            if isinstance(est, (int, float)) and est > 0:
                out[s["index"]] = float(est)
    return out


def current_phase(events: list[dict[str, Any]], plan: Plan | dict[str, Any] | None = None) -> Phase | None:
    """The phase the events leave open (the latest attempt's), or None."""
    tracker = PhaseTracker(estimates(plan))
    attempt = max((e.get("attempt", 0) for e in events), default=0)
    for e in events:
        if e.get("attempt", 0) == attempt:
            tracker.feed(e)
    return tracker.current
