"""The `prefect-managed` command as an operator runs it: the installed executable.

Every command and group has `--help` with examples; every error is one line on
standard error starting with `Error:`, with a non-zero exit code.
"""

from __future__ import annotations

import os
import subprocess

import docker.errors
import pytest
import typer.main
from services import BIN

from prefect_managed import __version__
from prefect_managed.cli import app

COMMAND = str(BIN / "prefect-managed")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [COMMAND, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "120", **(env or {})},
    )


def command_paths(command=None, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The path of every group and command of the CLI, the root included."""
    command = command or typer.main.get_command(app)
    paths = [path]
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        paths += command_paths(sub, (*path, name))
    return paths


def assert_one_error_line(done: subprocess.CompletedProcess[str], exit_code: int) -> str:
    assert done.returncode == exit_code, (done.returncode, done.stdout, done.stderr)
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("Error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize("path", command_paths(), ids=lambda p: " ".join(p) or "root")
def test_help_shows_examples_of_the_command(path):
    done = run(*path, "--help")

    assert done.returncode == 0, done.stderr
    assert "Example" in done.stdout
    example = " ".join(["prefect-managed", *path])
    example_lines = [
        line.strip() for line in done.stdout.splitlines() if line.strip().startswith(example)
    ]
    assert example_lines, f"no example starting with {example!r} in:\n{done.stdout}"


def test_image_build_is_a_command():
    assert ("image", "build") in command_paths()


def test_version_prints_the_package_version():
    done = run("--version")

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == __version__


def test_unknown_command_is_one_error_line_with_exit_code_2():
    line = assert_one_error_line(run("no-such-command"), 2)

    assert "no-such-command" in line


def test_unknown_option_is_one_error_line_with_exit_code_2():
    line = assert_one_error_line(run("image", "build", "--no-such-option"), 2)

    assert "--no-such-option" in line


def test_missing_ca_bundle_is_one_error_line_with_exit_code_1(tmp_path):
    missing = tmp_path / "missing-ca.pem"

    line = assert_one_error_line(run("image", "build", "--ca-bundle", str(missing)), 1)

    assert line.startswith("Error: The extra CA bundle")
    assert str(missing) in line


def test_unreachable_docker_engine_is_one_error_line_with_exit_code_1(tmp_path):
    socket = tmp_path / "no-docker.sock"

    line = assert_one_error_line(run("image", "build", env={"DOCKER_HOST": f"unix://{socket}"}), 1)

    assert line.startswith("Error: Cannot reach a Docker engine")
    assert line.endswith("start dockerd and try again.")


@pytest.mark.docker
def test_missing_base_image_is_one_error_line_with_exit_code_1(docker_client):
    missing = "prefect-managed-no-such-base:0"
    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get(missing)

    line = assert_one_error_line(run("image", "build", "--base-image", missing), 1)

    assert line == f"Error: The base image {missing!r} does not exist locally."
