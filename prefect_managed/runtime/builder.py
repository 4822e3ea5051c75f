"""Builds the local runtime image, for machines that cannot pull from a registry.

The image keeps the contract of ``prefecthq/prefect:3-latest``: the worker's Prefect
version, uv, git and tini, and an entrypoint that installs ``EXTRA_PIP_PACKAGES``
before running the command. It is built ``FROM`` a Debian base image made locally
with mmdebstrap, as no ``FROM python:...`` can be pulled.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable
from contextlib import closing
from importlib import resources
from pathlib import Path

import docker
import docker.errors
import prefect

from prefect_managed.exceptions import RuntimeImageError

__all__ = ["BASE_IMAGE", "build_runtime_image", "default_runtime_tag"]

BASE_IMAGE = "prefect-managed-base:bookworm"
DEBIAN_SUITE = "bookworm"
DEBIAN_PACKAGES = ("python3", "python3-venv", "git", "ca-certificates", "tini")

Progress = Callable[[str], None]


#: The runtime image's build context, besides the extra CA bundle.
RUNTIME_FILES = (
    "Dockerfile",
    "entrypoint.sh",
    "cache_evict.py",
    "prefork.py",
    "prefect-managed-teardown.pth",
)


def default_runtime_tag() -> str:
    """The runtime image's tag: it carries the worker's Prefect version."""
    return f"prefect-managed-runtime:{prefect.__version__}"


def _image_exists(client: docker.DockerClient, name: str) -> bool:
    try:
        client.images.get(name)
    except docker.errors.ImageNotFound:
        return False
    return True


def _make_base_image(client: docker.DockerClient, name: str, progress: Progress) -> None:
    mmdebstrap = shutil.which("mmdebstrap")
    if mmdebstrap is None:
        raise RuntimeImageError(
            f"The base image {name!r} does not exist and mmdebstrap, which makes it, is not "
            "installed: run 'apt-get install mmdebstrap', or pass --base-image with an image "
            "that has python3, python3-venv, git and tini."
        )
    repository, _, tag = name.partition(":")
    with tempfile.TemporaryDirectory(prefix="prefect-managed-base-") as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        progress(f"Making the base image {name} with mmdebstrap ({DEBIAN_SUITE})...")
        command = [
            mmdebstrap,
            "--quiet",
            "--variant=apt",
            f"--include={','.join(DEBIAN_PACKAGES)}",
            DEBIAN_SUITE,
            str(rootfs),
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-5:])
            raise RuntimeImageError(
                f"mmdebstrap failed with exit code {done.returncode} while making {name!r}:\n{tail}"
            )
        progress(f"Importing {rootfs.stat().st_size // 2**20} MiB as {name}...")
        client.api.import_image_from_file(str(rootfs), repository=repository, tag=tag or "latest")


def build_runtime_image(
    *,
    tag: str | None = None,
    base_image: str = BASE_IMAGE,
    extra_ca_bundle: Path | None = None,
    progress: Progress = print,
) -> str:
    """Build the runtime image and return its tag; make the base image first if missing."""
    tag = tag or default_runtime_tag()
    if extra_ca_bundle is not None and not extra_ca_bundle.is_file():
        raise RuntimeImageError(
            f"The extra CA bundle {str(extra_ca_bundle)!r} is not a file: give the path of a "
            "PEM bundle, or leave the option out."
        )
    try:
        client = docker.from_env()
    except docker.errors.DockerException as exc:
        raise RuntimeImageError(
            f"Cannot reach a Docker engine ({exc}); start dockerd and try again."
        ) from exc
    with closing(client), tempfile.TemporaryDirectory(prefix="prefect-managed-build-") as ctx:
        if not _image_exists(client, base_image):
            if base_image != BASE_IMAGE:
                raise RuntimeImageError(f"The base image {base_image!r} does not exist locally.")
            _make_base_image(client, base_image, progress)
        files = resources.files("prefect_managed.runtime")
        for name in RUNTIME_FILES:
            (Path(ctx) / name).write_bytes(files.joinpath(name).read_bytes())
        ca = extra_ca_bundle.read_bytes() if extra_ca_bundle else b""
        (Path(ctx) / "extra-ca.crt").write_bytes(ca)
        progress(f"Building {tag} (Prefect {prefect.__version__}) from {base_image}...")
        stream = client.api.build(
            path=ctx,
            tag=tag,
            rm=True,
            forcerm=True,
            network_mode="host",
            buildargs={"BASE_IMAGE": base_image, "PREFECT_VERSION": prefect.__version__},
            decode=True,
        )
        for chunk in stream:
            if "error" in chunk:
                raise RuntimeImageError(f"Building {tag!r} failed: {chunk['error'].strip()}")
            line = chunk.get("stream", "").rstrip()
            if line.startswith("Step "):
                progress(line)
    progress(f"Built {tag}.")
    return tag
