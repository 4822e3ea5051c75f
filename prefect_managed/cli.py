"""The `prefect-managed` command."""

from __future__ import annotations

from pathlib import Path

import typer

from prefect_managed.exceptions import ManagedError
from prefect_managed.settings import get_settings

app = typer.Typer(
    help="Prefect Managed work pools for self-hosted Prefect: the operator's commands.",
    no_args_is_help=True,
    add_completion=False,
)
image_app = typer.Typer(help="The local runtime image.", no_args_is_help=True)
app.add_typer(image_app, name="image")


def _fail(exc: ManagedError) -> None:
    typer.echo(f"Error: {exc}", err=True)
    raise typer.Exit(1)


@image_app.command("build")
def image_build(
    tag: str = typer.Option(None, help="Tag of the image (default: prefect-managed-runtime:<prefect version>)."),
    base_image: str = typer.Option(
        None, help="A local image with python3, python3-venv, git and tini to build from."
    ),
    ca_bundle: Path = typer.Option(
        None,
        help="A PEM bundle of extra certificate authorities to trust inside the image "
        "(default: the extra_ca_bundle setting).",
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
            extra_ca_bundle=ca_bundle or get_settings().extra_ca_bundle,
            progress=lambda line: typer.echo(line, err=True),
        )
    except ManagedError as exc:
        _fail(exc)
    typer.echo(built)
