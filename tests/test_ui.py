"""The Prefect UI, in a real browser: what a user sees of a managed pool.

Debian's chromium (/usr/bin/chromium, installed by scripts/setup.sh), driven headless by
Playwright, opens the UI that the test session's Prefect server serves at its root URL.
The browser loads 127.0.0.1 only: every other request is aborted, and the UI's requests
for Prefect's collection registry, which the server would fetch from the internet, are
answered with an empty registry. Screenshots go to test-output/screenshots/.

Prefect's work pool wizard lists the worker types of that public registry, which has no
`prefect:managed`, so a managed pool is created with the CLI (the `managed_pool`
fixture, as the quickstart says) and its form is the one on the pool's Edit page: the
same schema form the wizard's Configuration step shows.

A run finished by the session's managed worker shows its usage: the table artifact in
its page's Artifacts tab and on the artifact's page, and the workspace's monthly summary
under its key. docs/usage.md shows copies of those screenshots (docs/images/). A run is
cancelled with its page's Cancel button, as a user would, on a flow that ignores SIGTERM.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit
from uuid import UUID

import httpx
import pytest
from conftest import SHARED_OUTPUT, worker_policy
from faults import wait_for_records, wait_until_settled
from helpers import (
    create_pool,
    run_containers,
    session_workspace,
    summary_versions,
    usage_records,
    wait_for_final_state,
    wait_for_log,
    wait_for_usage_record,
    worker,
)
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright
from services import wait_for

from prefect_managed import ManagedVariables
from prefect_managed.policy import format_bytes
from prefect_managed.usage import month_of, run_key, summary_key

pytestmark = pytest.mark.docker

CHROMIUM = "/usr/bin/chromium"
# The flags this machine's chromium needs (no sandbox as root, no background traffic);
# Playwright adds --headless and a fresh --user-data-dir itself.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 30_000
# Titles of prefect-docker's fields that a managed pool's form must not offer.
DOCKER_ONLY_TITLES = (
    "Volumes",
    "Privileged",
    "Memory Swap Limit",
    "Network Mode",
    "Networks",
    "Container Configuration",
    "Image Pull Policy",
    "Auto Remove",
)


@pytest.fixture(scope="session")
def ui_url(prefect_server: str) -> str:
    """The UI's root URL; the server must serve it (PREFECT_UI_ENABLED, the default)."""
    root = prefect_server.removesuffix("/api")
    response = httpx.get(f"{root}/", timeout=10)
    assert response.status_code == 200, response.text[:500]
    assert "text/html" in response.headers["content-type"]
    return root


@pytest.fixture(scope="module")
def browser() -> Browser:
    """One browser for this module. Module scope ends Playwright's event loop with the
    module: while it runs, Prefect's sync calls elsewhere would return coroutines."""
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing; run scripts/setup.sh, which installs chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    directory = SHARED_OUTPUT / "screenshots"  # in any test process: one place
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _loopback_only(route: Route) -> None:
    url = urlsplit(route.request.url)
    if url.hostname != "127.0.0.1":
        route.abort()
    elif url.path.startswith("/api/collections/"):
        # The server would fetch this from Prefect's registry on GitHub: answer "empty".
        route.fulfill(status=200, json={})
    else:
        route.continue_()


@pytest.fixture
def page(browser: Browser) -> Page:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(TIMEOUT_MS)
    context.route("**/*", _loopback_only)
    # The server asks for its credential (PREFECT_SERVER_API_AUTH_STRING): the UI's login
    # keeps it in local storage, base64-encoded.
    credential = base64.b64encode(os.environ["PREFECT_API_AUTH_STRING"].encode()).decode()
    context.add_init_script(f"window.localStorage.setItem('prefect-password', '{credential}')")
    page = context.new_page()
    yield page
    context.close()


def test_prefect_ui_is_served_at_the_server_root(page: Page, ui_url: str, screenshots: Path):
    page.goto(f"{ui_url}/")

    expect(page.get_by_role("link", name="Work Pools").first).to_be_visible()
    page.wait_for_load_state("networkidle")
    page.screenshot(path=screenshots / "ui-home.png")


def test_managed_pool_form_shows_image_pip_packages_and_memory_with_titles_and_descriptions(
    page: Page, ui_url: str, managed_pool: str, screenshots: Path
):
    image = ManagedVariables.model_fields["image"].description
    pip_packages = ManagedVariables.model_fields["pip_packages"].description
    memory = ManagedVariables.model_fields["mem_limit"].description

    page.goto(f"{ui_url}/work-pools/work-pool/{managed_pool}/edit")

    expect(page.get_by_role("heading", name="Base Job Template")).to_be_visible()
    image_field = page.locator(".schema-form-property").filter(has_text=image).first
    pip_field = page.locator(".schema-form-property").filter(has_text=pip_packages).first
    image_field.scroll_into_view_if_needed()
    expect(image_field.get_by_role("heading", name="Image", exact=True)).to_be_visible()
    expect(image_field.get_by_text(image)).to_be_visible()
    expect(pip_field.get_by_text("Pip Packages (Optional)", exact=True)).to_be_visible()
    expect(pip_field.get_by_text(pip_packages)).to_be_visible()
    memory_field = page.locator(".schema-form-property").filter(has_text=memory).first
    expect(memory_field.get_by_role("heading", name="Memory Limit", exact=True)).to_be_visible()
    expect(memory_field.get_by_text(memory)).to_be_visible()
    page.wait_for_load_state("networkidle")
    page.screenshot(path=screenshots / "managed-pool-form.png")
    image_field.screenshot(path=screenshots / "managed-pool-form-image.png")
    pip_field.screenshot(path=screenshots / "managed-pool-form-pip-packages.png")
    memory_field.screenshot(path=screenshots / "managed-pool-form-memory-limit.png")


def test_managed_pool_form_offers_prefects_standard_variables(
    page: Page, ui_url: str, managed_pool: str
):
    page.goto(f"{ui_url}/work-pools/work-pool/{managed_pool}/edit")

    expect(page.get_by_role("heading", name="Base Job Template")).to_be_visible()
    for title in ("Environment Variables (Optional)", "Labels (Optional)"):
        expect(page.get_by_text(title, exact=True)).to_be_visible()
    for title in ("Name", "Command"):
        expect(page.get_by_role("heading", name=title, exact=True)).to_be_visible()


def test_managed_pool_form_hides_docker_only_fields(page: Page, ui_url: str, managed_pool: str):
    page.goto(f"{ui_url}/work-pools/work-pool/{managed_pool}/edit")

    expect(page.get_by_text(ManagedVariables.model_fields["image"].description)).to_be_visible()
    for title in DOCKER_ONLY_TITLES:
        expect(page.get_by_text(re.compile(rf"^{title}( \(Optional\))?$"))).to_have_count(0)


def test_managed_pool_page_shows_its_type_and_variables(
    page: Page, ui_url: str, managed_pool: str, screenshots: Path
):
    page.goto(f"{ui_url}/work-pools/work-pool/{managed_pool}")

    expect(page.get_by_text("Prefect:managed", exact=True)).to_be_visible()
    expect(page.get_by_text("Base Job Configuration")).to_be_visible()
    expect(page.get_by_text("Pip Packages", exact=True)).to_be_visible()
    page.wait_for_load_state("networkidle")
    page.screenshot(path=screenshots / "managed-pool-page.png", full_page=True)


# -- compute usage as the UI shows it ---------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(flows_repo, managed_pool, managed_worker) -> tuple[UUID, dict]:
    """A completed run of the `hello` flow on the managed pool, and its usage record.

    Deployed and waited for in a thread of its own: Playwright's sync API runs an event
    loop in this one, where Prefect's sync-compatible calls would return coroutines.
    """

    def deploy_and_run() -> tuple[UUID, dict]:
        from prefect import flow
        from prefect.deployments import run_deployment

        deployment = flow.from_source(source=flows_repo, entrypoint="probe_flows.py:hello").deploy(
            name="hello-ui-usage", work_pool_name=managed_pool, print_next_steps=False
        )
        flow_run_id = run_deployment(deployment, timeout=0).id
        run = wait_for_final_state(flow_run_id)
        assert run.state.is_completed(), run.state
        record = wait_for_usage_record(flow_run_id)
        # The month's summary is written within a few seconds of the record (at most
        # once every 5 s on a busy workspace): the pages below show it with this run.
        key = summary_key("tests", month_of(datetime.fromisoformat(record["finished_at"])))
        wait_for(
            lambda: (found := summary_versions(key)) and "hello-ui-usage" in found[0].data,
            60,
            "the month's summary",
        )
        return flow_run_id, record

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(deploy_and_run).result()


def test_a_finished_runs_page_shows_its_usage_artifact_with_the_measured_metrics(
    page: Page, ui_url: str, finished_run: tuple[UUID, dict], screenshots: Path
):
    flow_run_id, record = finished_run
    key = run_key("tests", month_of(datetime.fromisoformat(record["finished_at"])), flow_run_id)

    page.goto(f"{ui_url}/runs/flow-run/{flow_run_id}")
    # Prefect's tabs are list items of a tablist, without a role of their own.
    page.get_by_role("tablist").get_by_text("Artifacts", exact=True).click()

    artifact_link = page.get_by_text(key, exact=True).first
    expect(artifact_link).to_be_visible()
    page.wait_for_load_state("networkidle")
    page.screenshot(path=screenshots / "usage-run-artifacts-tab.png")
    artifact_link.click()
    table = page.locator("table").filter(has_text="billable minutes").first
    expect(table).to_be_visible()
    for metric, value in (
        ("outcome", "completed"),
        ("billable minutes", str(record["billable_minutes"])),
        ("wall time (s)", f"{record['wall_seconds']:.1f}"),
        ("peak memory", format_bytes(record["peak_memory_bytes"])),
        ("CPU seconds", f"{record['cpu_seconds']:.1f}"),
        ("work pool", "tests-managed-pool"),
        ("deployment", "hello-ui-usage"),
    ):
        row = table.locator("tr").filter(has=page.get_by_text(metric, exact=True))
        expect(row).to_have_count(1)
        expect(row.get_by_text(value, exact=True)).to_be_visible()
    page.wait_for_load_state("networkidle")
    page.screenshot(path=screenshots / "usage-run-artifact.png", full_page=True)


def test_the_monthly_summary_artifact_shows_hours_quota_and_breakdowns(
    page: Page, ui_url: str, finished_run: tuple[UUID, dict], screenshots: Path
):
    _, record = finished_run
    month = month_of(datetime.fromisoformat(record["finished_at"]))

    page.goto(f"{ui_url}/artifacts/key/{summary_key('tests', month)}")

    # The key's page: the latest description and a timeline of the summary's versions.
    expect(page.get_by_text(f"Compute usage of workspace tests in {month}").first).to_be_visible()
    versions = page.locator("a[href^='/artifacts/artifact/']")
    expect(versions.first).to_be_visible()
    page.wait_for_load_state("networkidle")
    page.screenshot(path=screenshots / "usage-monthly-summary-history.png", full_page=True)
    versions.first.click()  # the newest version, rendered

    expect(
        page.get_by_role("heading", name=f"Compute usage of workspace tests in {month}")
    ).to_be_visible()
    for header in ("used (h)", "quota (h)", "resets (UTC)", "work pool", "deployment"):
        expect(page.get_by_role("columnheader", name=header, exact=True)).to_be_visible()
    expect(page.get_by_role("cell", name="tests-managed-pool", exact=True)).to_be_visible()
    expect(page.get_by_role("cell", name="hello-ui-usage", exact=True)).to_be_visible()
    page.wait_for_load_state("networkidle")
    page.screenshot(path=screenshots / "usage-monthly-summary.png", full_page=True)


def test_the_work_pools_list_and_the_pools_page_show_the_months_usage_and_quota(
    page: Page,
    ui_url: str,
    managed_pool: str,
    main_policy: Path,
    finished_run: tuple[UUID, dict],
    screenshots: Path,
):
    """Where Prefect Cloud shows a managed pool's compute quota: the pool's description,
    kept current by the worker after each record, says the month's hours, the quota and
    the tier, with the hours the operator's `prefect-managed usage` counts."""

    def read() -> tuple[str, dict]:
        from helpers import usage_report
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            description = client.read_work_pool(managed_pool).description or ""
        return description, usage_report(main_policy)

    # The worker updates the line off the run's finish (at most once in a few seconds).
    deadline = time.monotonic() + 30
    with ThreadPoolExecutor(max_workers=1) as pool:
        while True:
            description, report = pool.submit(read).result()
            lines = [
                line for line in description.splitlines() if line.startswith("Compute this month")
            ]
            assert len(lines) == 1, description
            line = lines[0]
            expected = f"({report['month']}): {report['billable_minutes'] / 60:.2f} of "
            if expected in line or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert expected in line, (line, report)
    assert "workspace 'tests', test tier" in line

    page.goto(f"{ui_url}/work-pools")
    expect(page.get_by_text(line).first).to_be_visible()
    page.wait_for_load_state("networkidle")
    page.screenshot(path=screenshots / "usage-work-pools-list.png", full_page=True)

    page.goto(f"{ui_url}/work-pools/work-pool/{managed_pool}")
    expect(page.get_by_text(line).first).to_be_visible()
    page.wait_for_load_state("networkidle")
    page.screenshot(path=screenshots / "usage-work-pool-page.png", full_page=True)


def test_a_run_cancelled_with_its_pages_button_is_stopped_though_its_flow_ignores_sigterm(
    page: Page,
    ui_url: str,
    flows_repo: str,
    runtime_image: str,
    package_index,
    docker_client,
    tmp_path: Path,
    screenshots: Path,
):
    """The Cancel button of a running run's page, then Confirm, as a user cancels: the
    flow ignores the SIGTERM Prefect's runner passes on, so the worker stops its container
    once the policy's grace is over; the page then shows Cancelled, no container is left
    and the run's one usage record says `cancelled`."""
    grace = 10
    workspace = session_workspace("ui-cancel")
    policy = worker_policy(
        tmp_path / "ui-cancel.toml",
        runtime_image,
        package_index.url,
        workspace,
        {"cancel_grace_seconds": grace},
        concurrency_limit=1,
    )

    # Prefect's sync calls in a thread of their own (Playwright's event loop runs in this one).
    with ThreadPoolExecutor(max_workers=1) as background, ExitStack() as stack:

        def start() -> UUID:
            from prefect import flow
            from prefect.deployments import run_deployment

            pool = create_pool("ui-cancel-pool")
            deployment = flow.from_source(
                source=flows_repo, entrypoint="probe_flows.py:ignores_sigterm"
            ).deploy(name="ignores-sigterm-ui-cancel", work_pool_name=pool, print_next_steps=False)
            stack.enter_context(worker(pool, policy, "ui-cancel-worker"))
            flow_run_id = run_deployment(deployment, parameters={"seconds": 600}, timeout=0).id
            wait_for_log(flow_run_id, "ignores_sigterm: SIGTERM ignored", timeout=180)
            return flow_run_id

        flow_run_id = background.submit(start).result()

        page.goto(f"{ui_url}/runs/flow-run/{flow_run_id}")
        expect(page.get_by_text("Running", exact=True).first).to_be_visible()
        page.get_by_role("button", name="Cancel", exact=True).click()
        expect(page.get_by_text("Cancel Flow Run", exact=True)).to_be_visible()
        page.screenshot(path=screenshots / "cancel-flow-run-modal.png")
        page.get_by_role("button", name="Confirm", exact=True).click()
        expect(page.get_by_text("Cancelling", exact=True).first).to_be_visible()

        def container_running_after(seconds: float) -> bool:
            import time

            time.sleep(seconds)
            return any(c.status == "running" for c in run_containers(docker_client, flow_run_id))

        # Prefect's runner passed the cancel on; the flow ignored it.
        assert background.submit(container_running_after, grace / 2).result()
        run, records = background.submit(
            lambda: (
                wait_until_settled(docker_client, workspace, [flow_run_id], grace + 120)[0],
                (wait_for_records([flow_run_id]), usage_records(flow_run_id)),
            )
        ).result()
        logs = background.submit(
            wait_for_log, flow_run_id, "the worker stops the container", 60
        ).result()

        page.reload()
        expect(page.get_by_text("Cancelled", exact=True).first).to_be_visible()
        page.wait_for_load_state("networkidle")
        page.screenshot(path=screenshots / "cancel-flow-run-cancelled.png", full_page=True)

    assert run.state.is_cancelled(), (run.state.name, run.state.message)
    assert any("runtime.cancel_grace_seconds" in line for line in logs), logs
    counts, found = records
    assert counts == {flow_run_id: 1}
    assert [record["outcome"] for record in found] == ["cancelled"]
