"""2. Planning: ``optjob plan examples/cloud-a100-spot.yaml`` against SkyPilot's optimizer on the
same request and catalog — time, and the total cost of the offer each one picks."""

from __future__ import annotations

import json
from typing import Any

from .common import (
    CATALOG_V8,
    OPTJOB,
    PYTHON,
    REPO,
    Ctx,
    base_env,
    interleave,
    last_json,
    median,
    pair_ratios,
    ratio,
    run_cmd,
    sky_env,
    sky_home,
)

NAME = "planning"
TITLE = "Planning"
MEASURES = ("Wall time of `optjob plan examples/cloud-a100-spot.yaml` (catalog: `tests/data/skypilot-catalog/v8`) "
            "against a fresh process running SkyPilot's `Optimizer.optimize` on a `sky.Dag` with the same "
            "accelerators and spot request against the same catalog (temporary SkyPilot home, enabled clouds "
            "injected into SkyPilot's cache: see `benchmarks/sky_optimize.py`). Then the whole-spec cost of "
            "each one's chosen offer, both priced by optjob's estimator (SkyPilot itself assumes 1 hour).")
GOAL = "optjob plan < 0.5 s; optjob's chosen total cost <= the total of SkyPilot's choice"

SPEC = REPO / "examples" / "cloud-a100-spot.yaml"


def _sky_total(offer: dict[str, Any]) -> dict[str, Any]:
    """The spec's whole cost on SkyPilot's chosen node, by optjob's estimator."""
    from optjob.manager.pricing import Offer, estimate
    from optjob.specs import load_spec

    spec = load_spec(SPEC)
    name, count = offer["accelerator"], offer["count"]
    o = Offer(cloud=offer["cloud"], region=offer["region"], zone=offer["zone"],
              instance_type=offer["instance_type"], accelerators=f"{name}:{count}" if name else None,
              accelerator_name=name, accelerator_count=count, spot=offer["spot"],
              hourly_usd=offer["hourly_usd"], vcpus=None, memory_gb=None,
              ondemand_hourly_usd=None if offer["spot"] else offer["hourly_usd"])
    e = estimate(spec, o)
    return {"est_hours": e.total_hours, "est_usd": e.total_usd * 1.0}


def run(ctx: Ctx) -> dict[str, Any]:
    rounds, warmup = (1, 0) if ctx.quick else (4, 1)
    catalog = CATALOG_V8 if (CATALOG_V8 / "aws" / "vms.csv").is_file() else None
    extra = {"OPTJOB_CATALOG_DIR": str(catalog)} if catalog else {}
    env = base_env(OPTJOB_HOME=str(ctx.mkdtemp("home-")), **extra)
    plan_cmd = [OPTJOB, "plan", str(SPEC), "--json"]
    notes: list[str] = []
    if catalog is None:
        notes.append(f"no catalog at {CATALOG_V8}: optjob used its bundled snapshot, SkyPilot not run")
    import importlib.util

    if importlib.util.find_spec("sky") is None:
        notes.append("SkyPilot is not installed (the `cloud` extra): optjob timed alone")
    with sky_home(ctx.tmp) as home:
        if home is None or importlib.util.find_spec("sky") is None:
            times = interleave({"optjob plan": lambda: run_cmd(plan_cmd, env=env)[0]}, rounds, warmup=1)
            plan = json.loads(run_cmd(plan_cmd, env=env)[1].stdout)
            alone = median(times["optjob plan"])
            return {"summary": f"optjob plan {alone:.3f} s (SkyPilot not compared: see notes)",
                    "met": alone < 0.5, "metrics": {"median_s": {"optjob plan": alone}, "chosen": plan["chosen"]},
                    "notes": notes}
        senv = sky_env(home)
        sky_cmd = [PYTHON, "-m", "benchmarks.sky_optimize", str(SPEC)]
        run_cmd([*sky_cmd, "--inject"], env=senv, timeout=300)  # creates SkyPilot's state db, fills the cache
        sky_runs: list[dict[str, Any]] = []

        def sky_once() -> float:
            wall, proc = run_cmd(sky_cmd, env=senv, timeout=300)
            sky_runs.append(last_json(proc.stdout))
            return wall

        times = interleave({"optjob plan": lambda: run_cmd(plan_cmd, env=env)[0], "sky optimize": sky_once},
                           rounds, warmup=warmup)
    plan = json.loads(run_cmd(plan_cmd, env=env)[1].stdout)
    chosen = plan["chosen"]
    sky = sky_runs[-1]
    sky_cost = _sky_total(sky)
    same = (chosen["cloud"], chosen["region"], chosen["instance_type"], chosen["spot"]) == (
        sky["cloud"], sky["region"], sky["instance_type"], sky["spot"])
    med = {k: median(v) for k, v in times.items()}
    speedup = ratio(med["sky optimize"], med["optjob plan"])
    cheaper_or_equal = chosen["est_usd"] <= sky_cost["est_usd"] + 1e-6  # the plan rounds to 6 decimals
    metrics = {
        "rounds": rounds,
        "median_s": med,
        "speedup": speedup,
        "speedup_per_round_median": median(pair_ratios(times["sky optimize"], times["optjob plan"])),
        "sky_in_process_s": {"import": median([r["import_s"] for r in sky_runs[warmup:]]),
                             "optimize": median([r["optimize_s"] for r in sky_runs[warmup:]])},
        "optjob_choice": chosen,
        "optjob_offers": len(plan["offers"]),
        "sky_choice": {k: sky[k] for k in ("cloud", "region", "zone", "instance_type", "accelerator", "count",
                                           "spot", "hourly_usd")},
        "sky_choice_total_by_optjob_estimator": sky_cost,
        "sky_choice_cost_as_sky_sees_it_usd_1h": sky["hourly_usd"],
        "same_offer": same,
        "optjob_total_le_sky_total": cheaper_or_equal,
    }
    summary = (f"SkyPilot optimizer process / optjob plan = {speedup:.1f}x (optjob {med['optjob plan']:.3f} s, "
               f"sky {med['sky optimize']:.2f} s, of which optimize() "
               f"{metrics['sky_in_process_s']['optimize']:.2f} s); "
               f"optjob picks {chosen['cloud']}/{chosen['region']} {chosen['instance_type']} "
               f"{'spot ' if chosen['spot'] else ''}${chosen['hourly_usd']:.4f}/h, "
               f"whole spec ${chosen['est_usd']:.4f}; "
               f"SkyPilot picks {sky['cloud']}/{sky['region']} {sky['instance_type']} ${sky['hourly_usd']:.4f}/h, "
               f"whole spec ${sky_cost['est_usd']:.4f} by the same estimator "
               f"({'same offer' if same else 'different offer'})")
    return {"summary": summary, "met": med["optjob plan"] < 0.5 and cheaper_or_equal, "metrics": metrics,
            "notes": notes}
