"""1. CLI start-up: ``optjob --help`` and ``optjob validate`` against ``sky --help`` (and, where it
works offline, ``sky launch --dryrun``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import OPTJOB, REPO, SKY, Ctx, base_env, interleave, median, ratio, run_cmd, sky_env, sky_home

NAME = "cli_startup"
TITLE = "CLI start-up"
MEASURES = ("Wall time of `optjob --help` and `optjob validate examples/quickstart.yaml` against `sky --help` "
            "(fresh processes, interleaved; SkyPilot in a temporary home, offline). Also tries "
            "`sky launch --dryrun` offline with the shared catalog as `~/.sky/catalogs/v8`.")
GOAL = "optjob >= 5x faster than sky; optjob --help and validate median < 0.3 s"

TASK_YAML = """\
resources:
  accelerators: {A100:1, A100-80GB:1}
  use_spot: true
run: echo hello
"""


def _sky_launch_dryrun(ctx: Ctx, env: dict[str, str]) -> dict[str, Any]:
    """Try ``sky launch --dryrun`` once; time it if it works, else say why not."""
    task = ctx.tmp / "sky-task.yaml"
    task.write_text(TASK_YAML)
    try:
        wall, proc = run_cmd([SKY, "launch", "--dryrun", "-y", str(task)], env=env, timeout=120, check=False)
    except Exception as exc:  # a timeout: it waited for an API server or the network
        return {"works": False, "why": f"did not finish in 120 s ({type(exc).__name__})"}
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode == 0:
        return {"works": True, "wall_s": wall}
    last = [ln for ln in out.splitlines() if ln.strip()][-1:] or ["(no output)"]
    why = last[0].strip()[:300]
    if "backend is not supported" in out:
        why = (f"`sky launch` fails before planning with click {_click_version()}: \"{why}\" — its hidden "
               "`--docker` option (flag_value=docker, default=False) reaches the command as backend_name=False "
               "instead of None, so every `sky launch` in this environment stops there (optjob calls "
               "SkyPilot's Python API, not this CLI). Even with a working CLI, 0.14's `sky launch` goes "
               "through an API server that it starts in the background, which is not an offline dry run")
    else:
        # It got further than the CLI: an API server may have been started in that home. Stop it.
        run_cmd([SKY, "api", "stop"], env=env, timeout=60, check=False)
    return {"works": False, "why": why, "exit_code": proc.returncode}


def _click_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("click")


def run(ctx: Ctx) -> dict[str, Any]:
    rounds, warmup = (1, 0) if ctx.quick else (5, 1)
    spec = str(REPO / "examples" / "quickstart.yaml")
    env = base_env(OPTJOB_HOME=str(ctx.mkdtemp("home-")))
    sides = {
        "optjob --help": lambda: run_cmd([OPTJOB, "--help"], env=env)[0],
        "optjob validate": lambda: run_cmd([OPTJOB, "validate", spec], env=env)[0],
    }
    if not Path(SKY).exists():  # no `cloud` extra: optjob against its own targets only
        med = {k: median(v) for k, v in interleave(sides, rounds, warmup=warmup).items()}
        return {"summary": f"optjob --help {med['optjob --help']:.3f} s, validate {med['optjob validate']:.3f} s "
                           "(SkyPilot not installed: not compared)",
                "met": max(med.values()) < 0.3, "metrics": {"median_s": med}, "notes": []}
    with sky_home(ctx.tmp) as home:
        senv = sky_env(home) if home else base_env(**{"HOME": str(ctx.mkdtemp("skyhome-"))})
        sides["sky --help"] = lambda: run_cmd([SKY, "--help"], env=senv)[0]
        times = interleave(sides, rounds, warmup=warmup)
        dryrun = _sky_launch_dryrun(ctx, senv)
    med = {k: median(v) for k, v in times.items()}
    sky = med["sky --help"]
    metrics: dict[str, Any] = {
        "rounds": rounds,
        "median_s": med,
        "speedup_help": ratio(sky, med["optjob --help"]),
        "speedup_validate": ratio(sky, med["optjob validate"]),
        "sky_launch_dryrun": dryrun,
    }
    if dryrun.get("works"):
        metrics["speedup_vs_launch_dryrun"] = ratio(dryrun["wall_s"], med["optjob validate"])
    met = (min(metrics["speedup_help"], metrics["speedup_validate"]) >= 5.0
           and med["optjob --help"] < 0.3 and med["optjob validate"] < 0.3)
    summary = (f"sky --help / optjob --help = {metrics['speedup_help']:.1f}x, "
               f"sky --help / optjob validate = {metrics['speedup_validate']:.1f}x; "
               f"optjob --help {med['optjob --help']:.3f} s, validate {med['optjob validate']:.3f} s, "
               f"sky --help {sky:.2f} s (medians of {rounds})")
    if not dryrun.get("works"):
        summary += "; `sky launch --dryrun`: not measured (see notes)"
    notes = [] if dryrun.get("works") else [f"sky launch --dryrun: {dryrun['why']}"]
    return {"summary": summary, "met": met, "metrics": metrics, "notes": notes}
