"""The `prefect-managed` command.

Every error is one line on standard error, starting with ``Error:``, and a non-zero exit
code: 1 when the work failed, 2 for a wrong command or option (see `main`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from prefect_managed.exceptions import ManagedError
from prefect_managed.policy import format_bytes, format_seconds, load_policy
from prefect_managed.policy_runtime import BOUNDARY
from prefect_managed.settings import get_policy, get_settings

app = typer.Typer(
    help="""Prefect Managed work pools for self-hosted Prefect: the operator's commands.

    Examples:

        prefect-managed serve

        prefect-managed image build

        prefect-managed policy check policy.toml
    """,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
image_app = typer.Typer(
    help="""The local runtime image, for machines with no image registry.

    Example:

        prefect-managed image build --tag prefect-managed-runtime:dev
    """,
    no_args_is_help=True,
)
app.add_typer(image_app, name="image")
policy_app = typer.Typer(
    help="""The policy file: tiers, limits and runtime settings.

    Example:

        prefect-managed policy check policy.toml
    """,
    no_args_is_help=True,
)
app.add_typer(policy_app, name="policy")


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _fail(exc: ManagedError) -> None:
    typer.echo(f"Error: {_one_line(str(exc))}", err=True)
    raise typer.Exit(1)


def _print_version(value: bool) -> None:
    if value:
        from prefect_managed import __version__

        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        help="Print the version and exit.",
        is_eager=True,
        callback=_print_version,
    ),
) -> None:
    pass


@image_app.command("build")
def image_build(
    tag: str = typer.Option(
        None, help="Tag of the image (default: prefect-managed-runtime:<prefect version>)."
    ),
    base_image: str = typer.Option(
        None, help="A local image with python3, python3-venv, git and tini to build from."
    ),
    ca_bundle: Path = typer.Option(
        None,
        help="A PEM bundle of extra certificate authorities to trust inside the image "
        "(default: runtime.extra_ca_bundle of the policy file).",
    ),
) -> None:
    """Build the runtime image locally, for machines with no image registry.

    Prints the tag it built on standard output, its progress on standard error.

    Examples:

        prefect-managed image build

        prefect-managed image build --ca-bundle ./proxy-ca.pem

    Then make the tag it printed the default, in the policy file's [runtime] table:

        default_image = "prefect-managed-runtime:VERSION"
    """
    from prefect_managed.runtime.builder import BASE_IMAGE, build_runtime_image

    try:
        built = build_runtime_image(
            tag=tag,
            base_image=base_image or BASE_IMAGE,
            extra_ca_bundle=ca_bundle or get_policy().runtime.extra_ca_bundle,
            progress=lambda line: typer.echo(line, err=True),
        )
    except ManagedError as exc:
        _fail(exc)
    typer.echo(built)


@policy_app.command("check")
def policy_check(
    file: Path = typer.Argument(
        None,
        help="The policy file to check (default: the one the worker would read).",
        show_default=False,
    ),
) -> None:
    """Validate a policy file and print the limits it gives each tier.

    Examples:

        prefect-managed policy check policy.toml

        PREFECT_INTEGRATIONS_MANAGED_POLICY_FILE=policy.toml prefect-managed policy check
    """
    from rich.console import Console
    from rich.table import Table

    path = file or get_settings().resolved_policy_file()
    try:
        policy = load_policy(path)
    except ManagedError as exc:
        _fail(exc)
    source = str(path) if path else "the built-in policy (no policy file)"
    table = Table(title=f"Tiers in {source}")
    for column in (
        "tier",
        "concurrent runs",
        "managed pools",
        "memory / run",
        "CPUs / run",
        "max run time",
        "compute h / month",
        "disk / run",
        "GPUs / run",
        "infra retries",
    ):
        table.add_column(column)
    for name, tier in sorted(policy.tiers.items()):
        marker = " *" if name == policy.workspace.tier else ""
        table.add_row(
            f"{name}{marker}",
            str(tier.concurrency_limit),
            str(tier.pool_limit),
            format_bytes(tier.memory_bytes),
            f"{tier.cpus:g}",
            format_seconds(tier.max_run_seconds),
            f"{tier.compute_hours_per_month:g}",
            format_bytes(tier.disk_bytes) if tier.disk_bytes else "-",
            str(tier.gpus) if tier.gpus else "-",
            str(tier.infrastructure_retries),
        )
    console = Console()
    console.print(table)
    runtime = policy.runtime
    console.print(f"* Workspace {policy.workspace.name!r} is on the {policy.workspace.tier} tier.")
    console.print(f"Default image: {runtime.default_image}")
    console.print(f"Allowed images: {', '.join(runtime.allowed_images)}")
    console.print(
        f"Network mode: {runtime.network_mode}; user: {runtime.user}; pids limit: {runtime.pids_limit}"
    )
    console.print(f"Package index: {runtime.package_index_url or 'uv default'}")
    port = runtime.api_gateway_port
    if port == "auto":
        console.print("Run gateway: on, its port derived from the Prefect API URL and ledger key")
    elif port:
        console.print(f"Run gateway: http://127.0.0.1:{port}/api")
    else:
        console.print("Run gateway: OFF (runs hold the worker's Prefect credential)")
    if runtime.network_mode == "isolated":
        reached = ", ".join(sorted({str(d) for d in runtime.isolated_destinations()}))
        console.print(f"Isolated runs reach: the run gateway{', ' + reached if reached else ''}")
    host = policy.host
    console.print(
        f"Each host keeps {format_bytes(host.reserve_memory_bytes)} and {host.reserve_cpus:g} "
        f"CPUs; runs' CPU caps overcommitted {host.cpu_overcommit:g}x; a run whose worker is "
        f"silent {format_seconds(host.lost_after_seconds)} is lost with its host"
    )
    boundary = Table(title="Trust boundary (\\[runtime], see docs/security.md)")
    for column in ("setting", "this policy", "secure default", "opt-out", "the opt-out gives away"):
        boundary.add_column(column)
    values = runtime.boundary_values()
    for setting in BOUNDARY:
        value, off = values[setting.key]
        boundary.add_row(
            setting.key,
            f"{value} (OPTED OUT)" if off else value,
            setting.default,
            setting.opt_out,
            setting.gives_away,
        )
    console.print(boundary)


@app.command("usage")
def usage(
    month: str = typer.Option(
        None, help="The month, as YYYY-MM (default: this month, UTC).", show_default=False
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Print the workspace's compute usage in a month, from the Prefect server.

    Examples:

        prefect-managed usage

        prefect-managed usage --month 2026-10 --json
    """
    import json
    import re
    from datetime import datetime, timezone

    from prefect.client.orchestration import get_client
    from rich.console import Console
    from rich.table import Table

    from prefect_managed.ledger import UsageLedger
    from prefect_managed.usage import month_of, next_reset

    if month is not None and not re.fullmatch(r"\d{4}-(0[1-9]|1[0-2])", month):
        _fail(ManagedError(f"--month {month!r} is not a month; give it as YYYY-MM, e.g. 2026-11"))
    try:
        policy = get_policy()
    except ManagedError as exc:
        _fail(exc)
    month = month or month_of(datetime.now(timezone.utc))
    from prefect_managed.settings import ledger_key

    try:
        key = ledger_key(create=False)  # a key made here would verify nothing
    except ManagedError as exc:
        _fail(exc)

    async def read():
        async with get_client() as client:
            ledger = UsageLedger(client, policy.workspace.name, key=key)
            return await ledger.month_usage(month), ledger.rejected

    from prefect.utilities.asyncutils import run_coro_as_sync

    monthly, rejected = run_coro_as_sync(read())
    quota = policy.tier.compute_hours_per_month
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "workspace": monthly.workspace,
                    "tier": policy.workspace.tier,
                    "month": monthly.month,
                    "hours_used": round(monthly.hours, 4),
                    "billable_minutes": monthly.minutes,
                    "quota_hours": quota,
                    "percent_used": round(monthly.percent_of(quota), 2),
                    "resets": next_reset(monthly.month).isoformat(),
                    "runs": monthly.runs,
                    "attempts": len(monthly.records),
                    "hours_by_pool": monthly.hours_by("pool"),
                    "hours_by_deployment": monthly.hours_by("deployment"),
                    "runs_by_outcome": monthly.runs_by_outcome(),
                    "skipped_artifacts": {str(id_): why for id_, why in rejected.items()},
                    "records": [
                        record.model_dump(mode="json") for record in monthly.records.values()
                    ],
                },
                indent=2,
            )
        )
        return
    console = Console()
    console.print(
        f"Workspace {monthly.workspace!r} ({policy.workspace.tier} tier), {monthly.month}: "
        f"{monthly.hours:.2f} h of {quota:g} h used ({monthly.percent_of(quota):.1f} %), "
        f"{monthly.runs} runs; resets {next_reset(monthly.month).date().isoformat()} (UTC)"
    )
    table = Table()
    for column in (
        "flow run",
        "deployment",
        "pool",
        "outcome",
        "wall s",
        "billed min",
        "peak memory",
        "CPU s",
    ):
        table.add_column(column)
    for record in sorted(monthly.records.values(), key=lambda r: r.started_at):
        table.add_row(
            record.flow_run_name + (f" (attempt {record.attempt})" if record.attempt > 1 else ""),
            record.deployment or "",
            record.pool,
            record.outcome.value,
            f"{record.wall_seconds:.1f}",
            str(record.billable_minutes),
            format_bytes(record.peak_memory_bytes) if record.peak_memory_bytes else "-",
            f"{record.cpu_seconds:.1f}" if record.cpu_seconds is not None else "-",
        )
    console.print(table)
    if rejected:
        console.print(
            f"{len(rejected)} artifact(s) under the workspace's usage keys were skipped (not "
            "signed by its workers, or damaged); `--json` lists them."
        )


@app.command("serve")
def serve(
    name: str = typer.Option(
        None,
        help="The service's name; its worker for pool P is named NAME-P. Keep it stable "
        "per host, so that a restarted service takes over the runs it left (default: the "
        "host name).",
        show_default=False,
    ),
    poll_seconds: float = typer.Option(
        10.0, min=1.0, help="How often to look for managed pools created, paused or deleted."
    ),
    http_port: int = typer.Option(
        None,
        min=0,
        max=65535,
        help="Serve GET /health (for a process supervisor) and GET /metrics (Prometheus) "
        "on this port (0: any free port, printed at start). Default: not served.",
        show_default=False,
    ),
    http_host: str = typer.Option("127.0.0.1", help="The address --http-port listens on."),
    drain_on_sigterm: bool = typer.Option(
        False,
        "--drain-on-sigterm",
        help="On SIGTERM, drain (as on SIGUSR1) instead of stopping at once; a second "
        "SIGTERM stops. For supervisors that only send SIGTERM before an upgrade.",
    ),
) -> None:
    """Serve every prefect:managed work pool of the workspace, in one process.

    Runs one worker per managed pool, up to the tier's pool count (the oldest pools),
    picks up pools created later and stops serving pools that are paused or deleted.
    Unlike `prefect worker start`, it needs no --pool and no --type. On SIGTERM or
    Ctrl-C it claims no new runs and exits; running containers keep running, and the
    next start with the same --name finishes and records them. On SIGUSR1 it drains:
    it claims no new runs, lets the running ones end and records them, then exits.

    Examples:

        prefect-managed serve

        prefect-managed serve --name docker-host-2 --poll-seconds 5

        prefect-managed serve --http-port 9464 --drain-on-sigterm
    """
    import signal
    import socket

    import anyio
    from prefect.logging import get_logger

    from prefect_managed.gateway.host import check_boundary
    from prefect_managed.metrics import HealthServer
    from prefect_managed.service import ManagedService

    try:
        policy = get_policy()
        # Before any pool is served: a server without a credential stops the service
        # with one line, as it stops `prefect worker start`.
        check_boundary(policy.runtime, get_logger("prefect_managed.service"))
    except ManagedError as exc:
        _fail(exc)
    service = ManagedService(name or socket.gethostname(), policy, poll_seconds)
    http: HealthServer | None = None
    if http_port is not None:
        try:
            http = HealthServer(service, http_host, http_port)
        except OSError as exc:
            typer.echo(
                f"Error: cannot serve /health and /metrics on {http_host}:{http_port}: "
                f"{exc.strerror or exc}. Choose another --http-port (0: any free port).",
                err=True,
            )
            raise typer.Exit(1) from None
        http.start()
        typer.echo(f"Serving /health and /metrics on http://{http_host}:{http.port}", err=True)

    async def serve_until_signalled() -> None:
        async with anyio.create_task_group() as group:

            async def stop_on_signals() -> None:
                wanted = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
                with anyio.open_signal_receiver(*wanted) as signals:
                    async for received in signals:
                        drain = received == signal.SIGUSR1 or (
                            drain_on_sigterm and received == signal.SIGTERM and not service.draining
                        )
                        if drain:
                            typer.echo(
                                f"Received {signal.Signals(received).name}: draining: "
                                "claiming no new runs; exits once the running ones have "
                                "ended and are recorded (SIGTERM stops at once).",
                                err=True,
                            )
                            service.drain()
                            continue
                        if service.stopping:  # a second signal: stop at once
                            group.cancel_scope.cancel()
                            return
                        typer.echo(
                            f"Received {signal.Signals(received).name}: claiming no new runs "
                            "and stopping; running containers keep running and are finished "
                            f"by the next `prefect-managed serve --name {service.name}`.",
                            err=True,
                        )
                        service.stop()

            group.start_soon(stop_on_signals)
            await service.run()
            group.cancel_scope.cancel()

    # Returns normally, so Prefect flushes its logs and events at exit. The containers
    # left running are taken over by the next `prefect-managed serve --name <name>`.
    try:
        anyio.run(serve_until_signalled)
    finally:
        if http is not None:
            http.stop()


def main() -> None:
    """The `prefect-managed` command: a wrong command or option is one `Error:` line too."""
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as exc:  # typer's usage errors (it vendors click's)
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare group: its help, not an error
            exc.show()  # type: ignore[attr-defined]
        else:
            message = exc.format_message()  # type: ignore[attr-defined]
            typer.echo(f"Error: {_one_line(message)}", err=True)
        sys.exit(getattr(exc, "exit_code", 2))
    except typer.Abort:
        typer.echo("Error: aborted.", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
