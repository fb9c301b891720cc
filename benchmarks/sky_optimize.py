"""SkyPilot's own optimizer on a spec's resources, offline, in this process:
``python -m benchmarks.sky_optimize SPEC [--inject]`` prints one JSON line (the chosen offer,
and how long the import and the optimization took).

Run it with ``HOME`` pointing at a temporary home whose ``~/.sky/catalogs/v8`` holds the catalog
(see ``common.sky_home``). SkyPilot asks ``sky.check.get_cached_enabled_clouds_or_refresh`` which
clouds it may use. That function returns the list cached in SkyPilot's state database
(``global_user_state.get_cached_enabled_clouds``) and only runs the credential check
(``check_capability``) when the cache is empty or the allowed-clouds list changed. ``--inject``
fills both with SkyPilot's own setters (``set_enabled_clouds``, ``set_allowed_clouds``), so the
optimizer runs against the catalog with no credentials, no API server and no network; the
benchmark injects once, in the warm-up run, and times runs that only read the cache.
"""

from __future__ import annotations

import json
import sys
import time


def main(argv: list[str]) -> int:
    t0 = time.perf_counter()
    import sky
    from optjob.manager.pricing import SUPPORTED_CLOUDS
    from optjob.specs import load_spec
    from sky import check, global_user_state, optimizer, skypilot_config
    from sky.clouds import cloud as sky_cloud
    from sky.utils import registry

    t1 = time.perf_counter()
    spec = load_spec(argv[0])
    if "--inject" in argv:
        ws = skypilot_config.get_active_workspace()
        names = [str(registry.CLOUD_REGISTRY.from_str(c)) for c in SUPPORTED_CLOUDS]
        global_user_state.set_allowed_clouds(check._get_workspace_allowed_clouds(ws), ws)
        global_user_state.set_enabled_clouds(names, sky_cloud.CloudCapability.COMPUTE, ws)
    t2 = time.perf_counter()
    r = spec.resources
    cloud = None if r.cloud == "any" else registry.CLOUD_REGISTRY.from_str(r.cloud)
    choices: list[str | None] = [f"{n}:{c}" for n, c in r.accelerator_choices] or [None]
    task = sky.Task(run="true", num_nodes=r.nodes)
    task.set_resources({sky.Resources(cloud=cloud, accelerators=a, use_spot=bool(r.spot), region=r.region)
                        for a in choices})
    with sky.Dag() as dag:
        dag.add(task)
    optimizer.Optimizer.optimize(dag, quiet=True)
    t3 = time.perf_counter()
    best = task.best_resources
    assert best is not None, "the optimizer chose nothing"
    accs = best.accelerators or {}
    name, count = next(iter(accs.items())) if accs else (None, 0)
    print(json.dumps({
        "cloud": str(best.cloud).lower(), "region": best.region, "zone": best.zone,
        "instance_type": best.instance_type, "accelerator": name, "count": int(count),
        "spot": bool(best.use_spot), "hourly_usd": best.get_cost(3600),
        "import_s": t1 - t0, "inject_s": t2 - t1, "optimize_s": t3 - t2,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
