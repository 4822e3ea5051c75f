"""The docs say what the code does: the policy example is a valid file that sets every
key, the policy reference is generated from the models, and every message the docs quote
is the text the code produces."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from uuid import UUID

import pytest
from services import BIN

from prefect_managed.exceptions import ImageNotAllowed, InvalidJobVariable
from prefect_managed.messages import (
    awaiting_slot_message,
    out_of_memory_message,
    pool_not_served_message,
    run_time_exceeded_message,
)
from prefect_managed.policy import (
    BUILTIN_TIERS,
    Host,
    Policy,
    Runtime,
    Tier,
    Workspace,
    load_policy,
)
from prefect_managed.usage import (
    MonthlyUsage,
    Outcome,
    UsageRecord,
    quota_exhausted_message,
    quota_warning_message,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SOURCES = ROOT / "prefect_managed"
EXAMPLE_MARKER = "<!-- complete-policy-example"


def docs_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "scripts" / "docs_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fenced_block_after(markdown: str, marker: str, language: str) -> str:
    """The first ```language block after `marker` in a page."""
    start = markdown.index(marker)
    match = re.compile(rf"^```{language}\n(.*?)^```$", re.S | re.M).search(markdown, start)
    assert match, f"no ```{language} block after {marker!r}"
    return match.group(1)


def page_text(name: str) -> str:
    """A page's prose as a reader sees it: blockquote markers, escapes and line breaks gone."""
    markdown = (DOCS / name).read_text()
    text = re.sub(r"^> ?", "", markdown, flags=re.M).replace("\\*", "*")
    return " ".join(text.split())


@pytest.fixture
def example_file(tmp_path: Path) -> Path:
    markdown = (DOCS / "operator-guide.md").read_text()
    path = tmp_path / "policy.toml"
    path.write_text(fenced_block_after(markdown, EXAMPLE_MARKER, "toml"))
    return path


def test_the_operator_guides_complete_policy_example_is_a_valid_policy(example_file: Path):
    policy = load_policy(example_file)

    assert policy.workspace.name == "analytics" and policy.workspace.tier == "pro"
    assert policy.tier.concurrency_limit == 20
    assert set(policy.tiers) == {*BUILTIN_TIERS, "team"}


def test_the_operator_guides_complete_policy_example_sets_every_key(example_file: Path):
    data = tomllib.loads(example_file.read_text())

    tier_keys = {key for tier in data["tiers"].values() for key in tier}
    hint = "add it to the complete example in docs/operator-guide.md"
    assert set(data) == set(Policy.model_fields), hint
    assert set(data["workspace"]) == set(Workspace.model_fields), hint
    assert set(data["runtime"]) == set(Runtime.model_fields), hint
    assert tier_keys == set(Tier.model_fields), hint
    assert set(data["host"]) == set(Host.model_fields), hint


def test_policy_check_accepts_the_example_and_prints_what_the_guide_shows(example_file: Path):
    markdown = (DOCS / "operator-guide.md").read_text()
    shown = fenced_block_after(markdown, "`prefect-managed policy check` prints", "text")

    done = subprocess.run(
        [str(BIN / "prefect-managed"), "policy", "check", str(example_file)],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )

    assert done.returncode == 0, done.stderr
    for line in shown.splitlines():
        assert line in done.stdout.splitlines(), (line, done.stdout)
    assert re.search(r"│ team\s+│ 3\s+│ 2\s+│ 4 GiB\s+│ 2\s+│ 2 h\s+│ 50\s+│", done.stdout)


def test_the_policy_reference_lists_every_key_of_every_table():
    page = docs_hooks().render_policy_page()
    sections = re.split(r"^## ", page, flags=re.M)
    tables = {section.split("\n", 1)[0]: section for section in sections[1:]}

    for heading, model in (
        ("`[workspace]`", Workspace),
        ("`[tiers.<name>]`", Tier),
        ("`[runtime]`", Runtime),
        ("`[host]`", Host),
    ):
        for name, field in model.model_fields.items():
            row = next(
                (line for line in tables[heading].splitlines() if line.startswith(f"| `{name}` |")),
                None,
            )
            assert row is not None, (heading, name)
            assert " ".join(field.description.split()) in row


def test_the_policy_reference_shows_the_builtin_tiers_numbers():
    page = docs_hooks().render_policy_page()

    assert "| `concurrency_limit` | `1` | `10` |" in page
    assert "| `pool_limit` | `1` | `5` |" in page
    assert '| `memory` | `"2g"` (2 GiB) | `"2g"` (2 GiB) |' in page
    assert "| `max_run_seconds` | `86400` (24 h) | `86400` (24 h) |" in page
    assert "| `compute_hours_per_month` | `10` | `250` |" in page


def _month_of_usage(hours: list[float]) -> MonthlyUsage:
    usage = MonthlyUsage("default", "2026-11")
    start = datetime(2026, 11, 2, 9, tzinfo=timezone.utc)
    for number, length in enumerate(hours, start=1):
        usage.add(
            UsageRecord.from_timestamps(
                start,
                start + timedelta(hours=length),
                flow_run_id=UUID(int=number),
                flow_run_name=f"run-{number}",
                workspace="default",
                tier="free",
                pool="my-managed-pool",
                image="prefecthq/prefect:3-latest",
                outcome=Outcome.COMPLETED,
            )
        )
    return usage


def limits_page_messages() -> list[str]:
    """Each message docs/limits.md quotes, produced by the code for the page's example:
    workspace 'default' on the built-in free tier."""
    policy = Policy()
    submit = "Failed to submit flow run to infrastructure: "
    return [
        awaiting_slot_message(policy),
        pool_not_served_message(policy, "second-pool", ["my-managed-pool"]),
        out_of_memory_message(policy, policy.tier.memory_bytes),
        out_of_memory_message(policy, 512 * 2**20),
        submit
        + "InvalidJobVariable: "
        + str(InvalidJobVariable("mem_limit", "lots", "use Docker's units, such as 512m or 1g")),
        submit
        + "InvalidJobVariable: "
        + str(InvalidJobVariable("mem_limit", "0", "ask for a positive amount, such as 512m")),
        run_time_exceeded_message(policy),
        submit
        + "ImageNotAllowed: "
        + str(
            ImageNotAllowed("python:3.12", ["prefecthq/prefect:3*", "prefect-managed-runtime:*"])
        ),
        submit + "InvalidJobVariable: " + _refusal_of_env({"PREFECT_API_KEY": "stolen"}),
        quota_exhausted_message(_month_of_usage([8, 2]), 10, "free"),
        quota_warning_message(_month_of_usage([8]), 10, "free", 80),
        quota_warning_message(_month_of_usage([8, 2]), 10, "free", 100),
    ]


def _refusal_of_env(env: dict[str, str]) -> str:
    """What the worker says of a deployment's env, as the code writes it."""
    from prefect_managed.configuration import run_environment

    with pytest.raises(InvalidJobVariable) as refused:
        run_environment(env, {})
    return str(refused.value)


@pytest.mark.parametrize("message", limits_page_messages())
def test_the_limits_page_quotes_the_message_as_the_code_writes_it(message: str):
    assert message in page_text("limits.md")


def test_the_limits_page_quotes_the_mem_limit_the_code_rejects():
    # The values the page shows are really refused, with those reasons.
    from prefect_managed.configuration import memory_limit_bytes

    for value, reason in (("lots", "use Docker's units"), ("0", "ask for a positive amount")):
        with pytest.raises(InvalidJobVariable, match=reason):
            memory_limit_bytes(value, 2**31)


@pytest.mark.parametrize(
    "page, fragment",
    [
        ("usage.md", "Compute used by this flow run: "),
        ("usage.md", "minute(s), "),
        ("usage.md", "Taking over container "),
        ("usage.md", "without the flow run reporting a final state."),
        ("usage.md", "is not a month; give it as YYYY-MM, e.g. 2026-11"),
        ("usage.md", "prefect-managed.quota.warning"),
        ("limits.md", "AwaitingConcurrencySlot"),
        ("limits.md", "QuotaExhausted"),
        ("limits.md", "prefect-managed-"),
    ],
)
def test_a_fragment_the_docs_quote_is_in_the_code(page: str, fragment: str):
    assert fragment in page_text(page)
    assert any(fragment in text for text in code_strings()), fragment


def code_strings() -> list[str]:
    """Every string literal of the package as Python reads it (adjacent literals joined),
    with an f-string's placeholders as NUL, so a fragment cannot span one."""
    found = []
    for path in sorted(SOURCES.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.append(node.value)
            elif isinstance(node, ast.JoinedStr):
                found.append(
                    "".join(
                        part.value if isinstance(part, ast.Constant) else "\0"
                        for part in node.values
                    )
                )
    return found


def test_the_usage_page_shows_the_screenshots_the_ui_test_takes():
    markdown = (DOCS / "usage.md").read_text()
    ui_test = (ROOT / "tests" / "test_ui.py").read_text()

    for image in re.findall(r"\]\(images/([\w-]+\.png)\)", markdown):
        assert (DOCS / "images" / image).is_file(), image
        assert f'"{image}"' in ui_test, f"tests/test_ui.py does not take {image}"
    assert len(re.findall(r"\]\(images/", markdown)) == 5


def test_the_hardening_the_limits_page_lists_is_what_the_worker_applies():
    from prefect.client.schemas.objects import FlowRun

    from prefect_managed.configuration import ManagedJobConfiguration, api_label_value
    from prefect_managed.dependencies import CACHE_MOUNT, cache_volume_name
    from prefect_managed.gateway.port import run_gateway_port
    from prefect_managed.gateway.tunnel import ISOLATED_MOUNT, tunnel_directory

    policy = Policy()
    config = ManagedJobConfiguration(
        image=policy.runtime.default_image,
        pip_packages=["pandas"],
        privileged=True,
        volumes=["/var/run/docker.sock:/var/run/docker.sock"],
        networks=["bridge"],
        network_mode="bridge",
        auto_remove=True,
        image_pull_policy="Always",
        container_create_kwargs={"user": "0", "cap_add": ["ALL"], "privileged": True},
    )
    config.apply_policy(policy, FlowRun(flow_id=UUID(int=1), name="hostile"))
    kwargs = config.container_create_kwargs
    text = page_text("limits.md")

    assert kwargs["user"] == "1000:1000"
    assert "as the non-root user `runtime.user` (default `1000:1000`;" in text
    assert kwargs["cap_drop"] == ["ALL"] and "(`cap_drop: [ALL]`)" in text
    assert kwargs["security_opt"] == ["no-new-privileges"] and "with `no-new-privileges`" in text
    assert kwargs["pids_limit"] == 1024 and "`runtime.pids_limit` processes (default 1024)" in text
    assert set(kwargs) == {
        "user",
        "cap_drop",
        "security_opt",
        "pids_limit",
        "nano_cpus",
        "log_config",
        "extra_hosts",
        "sysctls",
        "entrypoint",
    }
    assert (
        "with `user`, `cap_drop`, `security_opt`, `pids_limit`, `nano_cpus` and `log_config`, "
        "plus `extra_hosts`, `sysctls` and `entrypoint` on the isolated network" in text
    )
    assert kwargs["log_config"]["config"] == {"max-size": str(10 * 2**20), "max-file": "3"}
    assert "`runtime.log_max_size` each (json-file, default 3 × 10 MiB)" in text
    volume = f"{cache_volume_name('default', api_label_value())}:{CACHE_MOUNT}:rw"
    tunnel = f"{tunnel_directory(run_gateway_port(policy.runtime))}:{ISOLATED_MOUNT}:ro"
    assert config.privileged is False and config.volumes == [volume, tunnel]
    assert volume.startswith("prefect-managed-cache-default-")
    assert "not privileged, with no Docker socket mounted and no host directory but one" in text
    assert "the run gateway's tunnel directory read-only" in text
    assert "named Docker volume `prefect-managed-cache-<workspace>-<digest>`" in text
    assert config.network_mode == "none" and config.networks == []
    assert "on the network `runtime.network_mode` (default `isolated`: Docker's `none`" in text
    assert config.registry_credentials is None and config.image_pull_policy == "IfNotPresent"
    assert "with no registry credentials, pulling only an image that is not present" in text
    assert config.auto_remove is False and "without `auto_remove`" in text


def test_a_run_without_pip_packages_gets_no_volume_at_all():
    from prefect.client.schemas.objects import FlowRun

    from prefect_managed.configuration import ManagedJobConfiguration
    from prefect_managed.gateway.port import run_gateway_port
    from prefect_managed.gateway.tunnel import ISOLATED_MOUNT, tunnel_directory

    policy = Policy()
    config = ManagedJobConfiguration(
        image=policy.runtime.default_image, volumes=["/:/host"], privileged=True
    )
    config.apply_policy(policy, FlowRun(flow_id=UUID(int=1), name="hostile"))

    tunnel = f"{tunnel_directory(run_gateway_port(policy.runtime))}:{ISOLATED_MOUNT}:ro"
    assert config.volumes == [tunnel]
    assert (
        "the volumes a container can get are, on the isolated network (the default), the run gateway's tunnel directory read-only"
        in page_text("limits.md")
    )


def test_the_security_page_lists_every_write_the_gateway_allows():
    """The allow-list's writes, each in the security page's table, and nothing more."""
    import re

    from prefect_managed.gateway.routes import ROUTES

    text = (DOCS / "security.md").read_text()
    table = text[text.index("It may **write** only here") : text.index('"Its own" is read')]
    documented = {
        route
        for cell in re.findall(r"^\| (`[^|]+`) \|", table, re.M)
        for route in re.findall(r"`([A-Z]+ /[^`]+)`", cell)
    }
    writes = {
        f"{route.method} {route.template}".replace(":uuid}", "}").replace(":str}", "}")
        for route in ROUTES
        if route.rule is not None
    }
    assert documented == writes


def test_the_security_pages_boundary_table_is_the_one_policy_check_prints():
    from prefect_managed.policy_runtime import BOUNDARY

    markdown = (DOCS / "security.md").read_text()
    section = markdown.split("## Secure by default", 1)[1].split("\n## ", 1)[0]
    rows = [
        [cell.strip().replace("`", "") for cell in line.strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("| `")
    ]
    assert rows == [
        [setting.key, setting.default, setting.opt_out, setting.gives_away] for setting in BOUNDARY
    ]
    for page in ("operator-guide.md", "quickstart.md"):
        assert "security.md#secure-by-default" in (DOCS / page).read_text(), page
