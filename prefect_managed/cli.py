"""The `prefect-managed` command."""

from __future__ import annotations

from pathlib import Path

import typer

from prefect_managed.exceptions import ManagedError
from prefect_managed.policy import format_bytes, format_seconds, load_policy
from prefect_managed.settings import get_policy, get_settings

app = typer.Typer(
    help="Prefect Managed work pools for self-hosted Prefect: the operator's commands.",
    no_args_is_help=True,
    add_completion=False,
)
image_app = typer.Typer(help="The local runtime image.", no_args_is_help=True)
app.add_typer(image_app, name="image")
policy_app = typer.Typer(
    help="The policy file: tiers, limits and runtime settings.", no_args_is_help=True
)
app.add_typer(policy_app, name="policy")


def _fail(exc: ManagedError) -> None:
    typer.echo(f"Error: {exc}", err=True)
    raise typer.Exit(1)


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

    Example:

        prefect-managed image build --ca-bundle /path/to/proxy-ca.pem

    Then point the worker at it:

        export PREFECT_INTEGRATIONS_MANAGED_DEFAULT_IMAGE=prefect-managed-runtime:<version>
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
