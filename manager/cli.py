"""The ``optjob`` command line: a thin click layer. Each command's work is in ``commands/<name>.py``,
imported inside the command, so ``--help`` loads neither pydantic models nor rich.

Errors are rendered in one place, ``main``: one line per problem, exit code from
the error class (see ``optjob.specs.errors``), traceback only with ``--debug``.
"""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

import click

EXIT_CODES = """Exit codes: 0 success, 1 job failed, 2 invalid spec or usage,
3 plan infeasible or over budget, 4 stopped by a budget cap, 130 interrupted."""


def _debug() -> bool:
    return "--debug" in sys.argv or os.environ.get("OPTJOB_DEBUG", "") not in ("", "0")


@click.group(epilog=EXIT_CODES, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show tracebacks (also OPTJOB_DEBUG=1).")
@click.version_option(package_name="optjob")
def cli(debug: bool) -> None:
    """optjob: declarative, cost-aware LLM optimization jobs.

    Write one YAML spec (model, steps, resources, budget), then `optjob plan` and `optjob apply`.
    """


def _layer_options(f: Any) -> Any:
    """``--set PATH=VALUE`` (repeatable) and ``--name``: what goes over a spec file."""
    f = click.option("--name", "job_name", metavar="NAME", help="The job's name, instead of the spec's.")(f)
    return click.option("--set", "sets", multiple=True, metavar="PATH=VALUE",
                        help="Override one field, e.g. --set budget.max_usd=5 --set steps.0.train.max_steps=100 "
                             "(VALUE is YAML; repeatable).")(f)


@cli.command()
@click.argument("specs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@_layer_options
def validate(specs: tuple[str, ...], sets: tuple[str, ...], job_name: str | None) -> None:
    """Check spec files; print every problem with its file:line:column.

    Each spec is checked as plan and apply would read it: with --set/--name over it and the user
    config ($OPTJOB_HOME/config.yaml) under it."""
    from optjob.specs import SpecError
    from optjob.specs.loader import load_layered

    from .user_config import spec_layers

    if job_name is not None and len(specs) > 1:
        from optjob.specs.errors import UsageError

        raise UsageError("--name names one job: give one SPEC")
    failed = []
    for path in specs:
        try:
            loaded = load_layered(path, spec_layers(sets, job_name))
        except SpecError as exc:
            failed.append(exc)
            for line in exc.errors:
                _error_line(line)
            continue
        spec = loaded.spec
        click.echo(f"ok: {path} ({spec.name}, {len(spec.steps)} steps)")
        for line in loaded.describe():
            click.echo(f"  {line}")
    if failed:
        raise SystemExit(2)


@cli.command()
def schema() -> None:
    """Print the spec's JSON Schema (for editor completion)."""
    import json

    from optjob.specs import JobSpec

    click.echo(json.dumps(JobSpec.model_json_schema(), indent=2))


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--local", is_flag=True, help="Plan to run on this machine, whatever resources.cloud says.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--sky-task", is_flag=True, help="Print the SkyPilot task YAML apply would launch (secrets left out).")
@_layer_options
def plan(spec: str, local: bool, as_json: bool, sky_task: bool, sets: tuple[str, ...], job_name: str | None) -> None:
    """Show what apply would do: resources, steps, cost to complete, budget."""
    from .commands.plan import plan_command

    plan_command(spec, local=local, as_json=as_json, sets=sets, name=job_name, sky_task=sky_task)


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--local", is_flag=True, help="Run on this machine, whatever resources.cloud says.")
@click.option("--dry-run", is_flag=True, help="Rehearse every step on a tiny proxy on this CPU; print the cloud cost.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--detach", is_flag=True, help="Launch and return; follow with `optjob status` / `logs`.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON, no live display.")
@click.option("--simulate-preemption", "kills", type=click.IntRange(0, 100), default=0, metavar="N",
              help="Local rehearsal: SIGKILL the workload N times at random points and resume, as spot would.")
@click.option("--preemption-seed", type=int, default=0, show_default=True, help="Seed for the kill points.")
@_layer_options
def apply(spec: str, local: bool, dry_run: bool, yes: bool, detach: bool, as_json: bool, kills: int,
          preemption_seed: int, sets: tuple[str, ...], job_name: str | None) -> None:
    """Validate, plan, provision, run every step, tear down, report."""
    from .commands.apply import apply_command

    apply_command(spec, local=local, dry_run=dry_run, yes=yes, detach=detach, as_json=as_json,
                  kills=kills, preemption_seed=preemption_seed, sets=sets, name=job_name)


@cli.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True)
def status(name: str | None, as_json: bool) -> None:
    """Phase, step, elapsed time and spend of one job (or all)."""
    from .commands.status import status_command

    status_command(name, as_json=as_json)


@cli.command("list")
@click.option("--json", "as_json", is_flag=True)
def list_(as_json: bool) -> None:
    """Every job optjob knows (and any cloud cluster left behind by a finished one)."""
    from .commands.orphans import warn_orphans
    from .commands.status import status_command
    from .store import open_store

    status_command(None, as_json=as_json)

    warn_orphans(open_store())  # only if a job ran on SkyPilot and its API server answers quickly


@cli.command()
@click.argument("name")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the job ends.")
@click.option("--attempt", type=click.IntRange(1), metavar="N", help="Only attempt N.")
@click.option("--tail", type=click.IntRange(1), metavar="N", help="Start with the last N lines.")
@click.option("--json", "as_json", is_flag=True, help="The raw lines, events as the workload wrote them.")
def logs(name: str, follow: bool, attempt: int | None, tail: int | None, as_json: bool) -> None:
    """Print a job's workload output, every attempt in order, events as readable lines."""
    from .commands.logs import logs_command

    logs_command(name, follow=follow, attempt=attempt, tail=tail, as_json=as_json)


@cli.command()
@click.argument("name", required=False)
@click.option("--orphans", is_flag=True, help="Instead: remove what SkyPilot still holds of finished jobs.")
def down(name: str | None, orphans: bool) -> None:
    """Stop a job and release its resources (idempotent)."""
    if orphans == (name is not None):
        raise click.UsageError("give a job NAME, or --orphans")
    if orphans:
        from .commands.orphans import down_orphans_command

        down_orphans_command()
        return
    from .commands.down import down_command

    assert name is not None
    down_command(name)


@cli.command()
@click.argument("name")
def pull(name: str) -> None:
    """Copy a job's artifacts from storage.artifacts (s3://... or a folder) into its job folder."""
    from .commands.pull import pull_command

    pull_command(name)


@cli.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def report(name: str, as_json: bool) -> None:
    """Write (and print the path of) the job's comparison report."""
    from .commands.report import report_command

    report_command(name, as_json=as_json)


@cli.group(invoke_without_command=True)
@click.option("--gpu", help="Accelerator, e.g. A100 or A100:8.")
@click.option("--spot", is_flag=True, help="Spot offers only.")
@click.option("--cloud", default="any", show_default=True, help="aws, gcp, azure, lambda, runpod or any.")
@click.option("--region")
@click.option("--limit", default=30, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def prices(ctx: click.Context, gpu: str | None, spot: bool, cloud: str, region: str | None, limit: int,
           as_json: bool) -> None:
    """List offers from the price catalog, cheapest first."""
    if ctx.invoked_subcommand is None:
        from .commands.prices import prices_command

        prices_command(gpu, spot, cloud, region, limit, as_json)


@prices.command("refresh")
def prices_refresh() -> None:
    """Rebuild the local price cache from SkyPilot's catalog."""
    from .commands.prices import refresh_command

    refresh_command()


@cli.command()
@click.argument("name", required=False)
@click.option("--since", metavar="SPAN", help="Only attempts that ran in the last SPAN (7d, 24h, 30m) or since a "
                                             "date (2026-01-31).")
@click.option("--json", "as_json", is_flag=True)
def cost(name: str | None, since: str | None, as_json: bool) -> None:
    """Spend per attempt (launched when, where), per cloud and accelerator, per job beside the estimate."""
    from .commands.cost import cost_command

    cost_command(name, as_json, since=since)


def _error_line(message: str) -> None:
    click.echo(click.style("error: ", fg="red", bold=True) + message, err=True)


def _fail(exc: BaseException, code: int) -> NoReturn:
    if _debug():
        import traceback

        traceback.print_exception(exc)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> Any:
    """Console entry point."""
    # pydantic scans every installed distribution for plugins at import (importlib.metadata);
    # optjob uses none, and the scan is a tenth of `optjob validate`'s start-up.
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    from optjob.specs.errors import OptjobError, SpecError

    try:
        return cli.main(args=argv, standalone_mode=False)
    except SpecError as exc:
        for line in exc.errors:
            _error_line(line)
        _fail(exc, exc.exit_code)
    except OptjobError as exc:
        _error_line(str(exc))
        _fail(exc, exc.exit_code)
    except click.exceptions.Abort as exc:
        _error_line("aborted")
        _fail(exc, 130)
    except click.ClickException as exc:
        exc.show()
        _fail(exc, 2)
    except KeyboardInterrupt as exc:
        _error_line("interrupted")
        _fail(exc, 130)
    except SystemExit:
        raise
    except Exception as exc:  # a bug of ours: still one line, unless --debug
        _error_line(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)")
        _fail(exc, 1)


if __name__ == "__main__":
    main()
