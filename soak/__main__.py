"""The soak: many flow runs through one managed pool with faults injected at random, then
proof that nothing was lost. Everything runs on loopback: a Prefect server on SQLite, a
git daemon with the test flows, a package index, and `prefect worker start` processes.

    python -m soak --runs 200                 # the worker killed and restarted, containers
                                              # removed, runs cancelled, the server down 30 s
    python -m soak --runs 200 --docker-restart   # also restarts the Docker daemon (it kills
                                              # every container of the engine: CI or alone)

It writes soak/results/<UTC time>.md and .json: what completed, what failed and why, the
faults injected, and the checks (every run final, no container left, no concurrency slot
held, exactly one usage record per run that had a container). It exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import closing
from datetime import datetime, timedelta, timezone
from pathlib import Path
from uuid import UUID

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from services import free_port  # noqa: E402

_HOME = Path(tempfile.mkdtemp(prefix="prefect-managed-soak-"))
_PORT = free_port()
os.environ["PREFECT_HOME"] = str(_HOME / "client-home")
os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{_PORT}/api"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
# The server requires a credential (workers refuse one that does not); the soak's clients
# and workers send it.
_AUTH = f"soak:{secrets.token_hex(16)}"
os.environ["PREFECT_API_AUTH_STRING"] = _AUTH
_SERVER_ENV = {"PREFECT_SERVER_API_AUTH_STRING": _AUTH}

import docker  # noqa: E402
from prefect import flow  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.deployments import run_deployment  # noqa: E402
from services import (  # noqa: E402
    BIN,
    build_wheel,
    start_git_server,
    start_package_index,
    start_prefect_server,
    start_worker,
    wait_for,
    write_policy,
)

WORKSPACE = "soak"
POOL = "soak-pool"
MAX_RUN_SECONDS = 40
# (deployment, flow, parameters, job variables, weight, what the run should end as)
KINDS = {
    "hello": ("hello", {}, {}, 50, "COMPLETED"),
    "sleeper": ("sleeper", {"seconds": 8}, {}, 25, "COMPLETED"),
    "probe": ("probe", {}, {"pip_packages": ["managed-probe==1.0.0"]}, 10, "COMPLETED"),
    "oom": ("allocate", {"megabytes": 1024}, {"mem_limit": "256m"}, 5, "CRASHED"),
    "timeout": ("sleeper", {"seconds": 300}, {}, 3, "CRASHED"),
    "bad-package": ("hello", {}, {"pip_packages": ["no-such-package-soak"]}, 7, "CRASHED"),
}


class Seen:
    """Flow run ids whose container Docker created.

    Read live from Docker's event stream, not polled: a container that lives less than
    a polling interval (a failed install) would be missed. After the daemon restarts
    (a fault of the soak) the stream is opened again from the last event seen.
    """

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self._stop = threading.Event()
        self._events = None
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        since = int(time.time()) - 1
        while not self._stop.is_set():
            try:
                with closing(docker.from_env()) as client:
                    self._events = client.api.events(
                        since=since,
                        filters={
                            "type": "container",
                            "event": "create",
                            "label": f"io.prefect-managed.workspace={WORKSPACE}",
                        },
                        decode=True,
                    )
                    for event in self._events:
                        since = max(since, int(event.get("time", since)))
                        run_id = event["Actor"]["Attributes"].get("io.prefect.flow-run-id")
                        if run_id:
                            self.ids.add(run_id)
            except Exception:  # the daemon may be restarting, or `stop` closed the stream
                pass
            self._stop.wait(1)

    def stop(self) -> None:
        self._stop.set()
        time.sleep(1)  # let the last events arrive
        if self._events is not None:
            self._events.close()
        if self._thread.is_alive():
            self._thread.join(10)


def client_retry(call, attempts: int = 90):
    """Call `call(client)`, retrying while the server is down (a fault of the soak)."""
    for attempt in range(attempts):
        try:
            with get_client(sync_client=True) as client:
                return call(client)
        except Exception:
            if attempt == attempts - 1:
                raise
            time.sleep(1)


class Soak:
    def __init__(self, args: argparse.Namespace, out: Path) -> None:
        self.args = args
        self.out = out
        self.rng = random.Random(args.seed)
        self.runs: dict[str, dict] = {}
        self.unfinished: set[str] = set()
        self.worker_exits = 0
        self.fault_errors: list[str] = []
        self.faults: list[dict] = []
        self.worker = None
        self.worker_env: dict[str, str] = {}
        self.server = None

    # -- setup ---------------------------------------------------------------------
    def start(self) -> None:
        logs = self.out
        self.server = start_prefect_server(_PORT, _HOME / "server-home", logs, _SERVER_ENV)
        git = start_git_server(_HOME / "git", logs)
        self.git = git
        flows = (ROOT / "tests" / "flows" / "probe_flows.py").read_text()
        repo = git.publish("flows", {"probe_flows.py": flows})
        build_wheel(
            _HOME / "index",
            "managed-probe",
            "1.0.0",
            {"managed_probe/__init__.py": "MESSAGE = 'soak'\n"},
        )
        self.index = start_package_index(_HOME / "index", logs)
        from prefect_managed.runtime.builder import default_runtime_tag

        policy = write_policy(
            _HOME / "policy.toml",
            workspace={"name": WORKSPACE, "tier": "soak"},
            tiers={
                "soak": {
                    "concurrency_limit": self.args.concurrency,
                    "pool_limit": 100,
                    "memory": "1g",
                    "max_run_seconds": MAX_RUN_SECONDS,
                    "compute_hours_per_month": 10_000,
                }
            },
            runtime={
                "default_image": default_runtime_tag(),
                "package_index_url": self.index.url,
            },
        )
        done = subprocess.run(
            [str(BIN / "prefect"), "work-pool", "create", POOL, "--type", "prefect:managed"],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise SystemExit(done.stdout + done.stderr)
        self.deployments = {}
        for kind, (flow_name, _, job_variables, _, _) in KINDS.items():
            self.deployments[kind] = flow.from_source(
                source=repo, entrypoint=f"probe_flows.py:{flow_name}"
            ).deploy(
                name=f"soak-{kind}",
                work_pool_name=POOL,
                job_variables=job_variables,
                print_next_steps=False,
            )
        self.worker_env = {
            "PREFECT_INTEGRATIONS_MANAGED_POLICY_FILE": str(policy),
            "PREFECT_WORKER_QUERY_SECONDS": "1",
        }
        self.worker = start_worker(POOL, logs, self.worker_env, name="soak-worker")
        wait_for(self.worker_online, 600, "the soak worker online", 2)

    def worker_online(self) -> bool:
        workers = client_retry(lambda client: client.read_workers_for_work_pool(POOL))
        return any(w.name == "soak-worker" and w.status.value == "ONLINE" for w in workers)

    def stop(self) -> None:
        for service in (
            self.worker.service if self.worker else None,
            getattr(self, "index", None) and self.index.service,
            getattr(self, "git", None) and self.git.service,
            self.server,
        ):
            if service:
                service.stop()

    # -- runs and faults -----------------------------------------------------------
    def submit(self) -> None:
        kinds = list(KINDS)
        kind = self.rng.choices(kinds, weights=[KINDS[k][3] for k in kinds])[0]
        parameters = KINDS[kind][1]
        run = client_retry(
            lambda client: run_deployment(
                self.deployments[kind], parameters=parameters, timeout=0, client=None
            )
        )
        self.runs[str(run.id)] = {"kind": kind, "faults": []}
        self.unfinished.add(str(run.id))

    def running_containers(self) -> list:
        with closing(docker.from_env()) as client:
            return client.containers.list(
                filters={"label": f"io.prefect-managed.workspace={WORKSPACE}", "status": "running"}
            )

    def inject(self) -> None:
        choices = ["kill-worker", "remove-container", "cancel-run", "server-down"]
        if self.args.docker_restart:
            choices.append("docker-restart")
        fault = self.rng.choice(choices)
        at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        targets: list[str] = []
        if fault == "kill-worker":
            os.kill(self.worker.service.process.pid, signal.SIGKILL)
            self.worker.service.process.wait()
            time.sleep(self.rng.uniform(1, 10))
            self.worker = start_worker(POOL, self.out, self.worker_env, name="soak-worker")
            targets = [c.labels.get("io.prefect.flow-run-id") for c in self.running_containers()]
        elif fault in ("remove-container", "cancel-run"):
            running = self.running_containers()
            if not running:
                return
            container = self.rng.choice(running)
            target = container.labels["io.prefect.flow-run-id"]
            targets = [target]
            if fault == "remove-container":
                subprocess.run(["docker", "rm", "-f", container.id], capture_output=True)
            else:
                subprocess.run(
                    [str(BIN / "prefect"), "flow-run", "cancel", target],
                    capture_output=True,
                    timeout=120,
                )
        elif fault == "server-down":
            targets = [c.labels.get("io.prefect.flow-run-id") for c in self.running_containers()]
            self.server.stop()
            time.sleep(30)
            self.server = start_prefect_server(_PORT, _HOME / "server-home", self.out, _SERVER_ENV)
        elif fault == "docker-restart":
            targets = [c.labels.get("io.prefect.flow-run-id") for c in self.running_containers()]
            from faults import restart_docker_daemon

            restart_docker_daemon()
        for target in targets:
            if target in self.runs:
                self.runs[target]["faults"].append(fault)
        until = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.faults.append({"fault": fault, "at": at, "until": until, "runs": targets})
        print(f"soak: {at} {fault} ({len(targets)} run(s) in flight)", flush=True)

    def drive(self) -> None:
        total = self.args.runs
        next_fault = time.monotonic() + self.rng.uniform(20, 60)
        stop_at = time.monotonic() + self.args.max_minutes * 60
        while len(self.runs) < total and time.monotonic() < stop_at:
            in_flight = client_retry(self.count_unfinished)
            if in_flight < self.args.concurrency * 2:
                for _ in range(min(self.args.concurrency, total - len(self.runs))):
                    self.submit()
            if self.worker.service.process.poll() is not None:
                # What a supervisor (systemd, Kubernetes) does; counted in the report.
                self.worker_exits += 1
                print("soak: the worker exited; restarting it", flush=True)
                self.worker = start_worker(POOL, self.out, self.worker_env, name="soak-worker")
            if time.monotonic() > next_fault:
                try:
                    self.inject()
                except Exception as exc:  # the soak survives its own faults
                    self.fault_errors.append(f"{type(exc).__name__}: {exc}")
                    print(f"soak: injecting a fault failed: {exc!r}", flush=True)
                next_fault = time.monotonic() + self.rng.uniform(20, 60)
            time.sleep(2)
            print(f"soak: {len(self.runs)}/{total} submitted, {in_flight} unfinished", flush=True)

    def count_unfinished(self, client) -> int:
        """Runs not final yet; only those are read again (the server is SQLite)."""
        for run_id in list(self.unfinished):
            state = client.read_flow_run(run_id).state
            if state is not None and state.is_final():
                self.unfinished.discard(run_id)
        return len(self.unfinished)

    # -- the checks ----------------------------------------------------------------
    def settle(self, seen: Seen, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            final = client_retry(self.read_final)
            with closing(docker.from_env()) as client:
                left = client.containers.list(
                    all=True, filters={"label": f"io.prefect-managed.workspace={WORKSPACE}"}
                )
            slots = client_retry(
                lambda client: (
                    client.read_global_concurrency_limit_by_name(
                        f"prefect-managed-{WORKSPACE}"
                    ).active_slots
                )
            )
            unfinished = [run_id for run_id, (state, _) in final.items() if state not in FINAL]
            if (not unfinished and not left and slots == 0) or time.monotonic() > deadline:
                break
            time.sleep(5)
        time.sleep(5)  # the last usage records
        records = client_retry(self.read_records)
        had = set(seen.ids) & set(self.runs)
        # A run whose environment build failed ran no container of its own: its builder
        # ran for it, and its record bills the build (prefect_managed.environment_step).
        built = {
            run_id
            for run_id in records
            if run_id in self.runs
            and run_id not in had
            and client_retry(lambda client, r=run_id: self.environment_built(client, r))
        }
        for run_id, (state, _) in final.items():
            info = self.runs[run_id]
            if state != KINDS[info["kind"]][4] and not info["faults"]:
                info["faults"] += client_retry(
                    lambda client, r=run_id: self.faults_during(client, r)
                )
        return {
            "final": final,
            "containers_left": [c.name for c in left],
            "active_slots": slots,
            "unfinished": unfinished,
            "records": records,
            "had_container": sorted(had),
            "environment_built": sorted(built),
        }

    def environment_built(self, client, run_id: str) -> bool:
        """Whether the run's logs hold its environment build's output."""
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(run_id)]))
        )
        return any("Environment build output:" in log.message for log in logs)

    def faults_during(self, client, run_id: str) -> list[str]:
        """The faults under way while the run was being started or ran (from its first
        Pending to its final state, a few seconds either side): a fault hits a run whose
        container was not running yet when it began (a server down while the container
        reads its run, an engine restarting while the worker creates it)."""
        states = client.read_flow_run_states(UUID(run_id))
        pending = [s.timestamp for s in states if s.type.value == "PENDING"]
        if not pending:
            return []
        start, end = min(pending), max(s.timestamp for s in states)
        margin = timedelta(seconds=FAULT_MARGIN_SECONDS)
        return [
            f"{fault['fault']} (under way at its start)"
            for fault in self.faults
            if datetime.fromisoformat(fault["at"]) - margin <= end
            and start <= datetime.fromisoformat(fault.get("until", fault["at"])) + margin
        ]

    def read_final(self, client) -> dict[str, tuple[str, str]]:
        result = {}
        for run_id in self.runs:
            state = client.read_flow_run(run_id).state
            result[run_id] = (state.type.value, (state.message or "")) if state else ("NONE", "")
        return result

    def read_records(self, client) -> dict[str, int]:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        counts: Counter = Counter()
        offset = 0
        while True:
            page = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_=f"usage-{WORKSPACE}-")),
                limit=200,
                offset=offset,
            )
            for artifact in page:
                if artifact.metadata_ and "usage_record" in artifact.metadata_:
                    counts[str(artifact.flow_run_id)] += 1
            if len(page) < 200:
                return dict(counts)
            offset += 200


FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

#: Seconds either side of a fault's window within which a run's start counts as hit.
FAULT_MARGIN_SECONDS = 5


def why(kind: str, faults: list[str], state: str, message: str) -> str:
    """A short reason for a run's end, from its final state's message."""
    text = message.lower()
    for key, label in (
        ("out of memory", "out of memory (as designed)"),
        ("maximum run time", "maximum run time (as designed)"),
        ("installing pip_packages", "pip_packages install failed (as designed)"),
        ("removed from outside", "container removed from outside (fault)"),
        ("docker engine stopped", "Docker engine restarted (fault)"),
    ):
        if key in text:
            return label
    if state == "CANCELLED":
        return "cancelled (fault)"
    started_during = [f.split(" (")[0] for f in faults if "under way" in f]
    if started_during:
        return f"{' and '.join(started_during)} while it was being started (fault)"
    return f"{state.lower()}: {message[:120]}" if message else state.lower()


def report(soak: Soak, result: dict, started: datetime, out: Path) -> bool:
    final, records = result["final"], result["records"]
    had = set(result["had_container"]) | set(result.get("environment_built", ()))
    record_problems = {
        run_id: records.get(run_id, 0) for run_id in had if records.get(run_id, 0) != 1
    }
    extra_records = {r: n for r, n in records.items() if r not in had and r in soak.runs}
    unexpected = []
    for run_id, info in soak.runs.items():
        state, message = final[run_id]
        expected = KINDS[info["kind"]][4]
        if state != expected and not info["faults"]:
            unexpected.append((run_id, info["kind"], state, message[:160]))
    checks = {
        "every run final": not result["unfinished"],
        "no container left": not result["containers_left"],
        "no concurrency slot held": result["active_slots"] == 0,
        "the worker never exited on its own": soak.worker_exits == 0,
        "every fault was injected and undone": not soak.fault_errors,
        "one usage record per run that had a container": not record_problems,
        "no usage record for a run without a container": not extra_records,
        "every run without a fault ended as its kind should": not unexpected,
    }
    by_state = Counter(state for state, _ in final.values())
    reasons = Counter(
        why(info["kind"], info["faults"], *final[run_id])
        for run_id, info in soak.runs.items()
        if final[run_id][0] != "COMPLETED"
    )
    faults = Counter(f["fault"] for f in soak.faults)
    finished = datetime.now(timezone.utc)
    lines = [
        f"# Soak {started:%Y-%m-%d %H:%M} UTC",
        "",
        f"`python -m soak --runs {soak.args.runs} --seed {soak.args.seed} "
        f"--max-minutes {soak.args.max_minutes:g}"
        f"{' --docker-restart' if soak.args.docker_restart else ''}`: "
        f"{len(soak.runs)} flow runs sent, {soak.args.concurrency} at a time, "
        f"{(finished - started).total_seconds() / 60:.1f} min, everything on loopback.",
        "",
        "## Checks",
        "",
        *[f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in checks.items()],
        "",
        f"Runs that had a container: {len(had)} (of which "
        f"{len(result.get('environment_built', ()))} only the builder of their "
        f"environment, whose build failed); usage records for them: "
        f"{sum(records.get(r, 0) for r in had)}. Runs hit by a fault that began while "
        "they were being started: "
        f"{sum(1 for i in soak.runs.values() if any('under way' in f for f in i['faults']))}.",
        "",
        "## Final states",
        "",
        "| state | runs |",
        "|---|---|",
        *[f"| {state} | {count} |" for state, count in sorted(by_state.items())],
        "",
        "## Why runs did not complete",
        "",
        "| reason | runs |",
        "|---|---|",
        *[f"| {reason} | {count} |" for reason, count in reasons.most_common()],
        "",
        "## Runs by kind",
        "",
        "| kind | runs | expected without a fault |",
        "|---|---|---|",
        *[
            f"| {kind} | {sum(1 for i in soak.runs.values() if i['kind'] == kind)} | {KINDS[kind][4]} |"
            for kind in KINDS
        ],
        "",
        "## Faults injected",
        "",
        "| fault | times | runs in flight hit |",
        "|---|---|---|",
        *[
            f"| {fault} | {count} | "
            f"{sum(len(f['runs']) for f in soak.faults if f['fault'] == fault)} |"
            for fault, count in faults.items()
        ],
        "",
    ]
    if soak.fault_errors:
        lines += ["## Faults that failed", "", *[f"- {error}" for error in soak.fault_errors], ""]
    if unexpected or record_problems or result["unfinished"] or result["containers_left"]:
        lines += [
            "## Problems",
            "",
            "```",
            json.dumps(
                {
                    "unexpected": unexpected,
                    "record_problems": record_problems,
                    "unfinished": result["unfinished"],
                    "containers_left": result["containers_left"],
                },
                indent=2,
            ),
            "```",
            "",
        ]
    stamp = f"{started:%Y%m%dT%H%M%SZ}"
    results = ROOT / "soak" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{stamp}.md").write_text("\n".join(lines))
    (results / f"{stamp}.json").write_text(
        json.dumps(
            {
                "runs": {
                    run_id: {**info, "state": final[run_id][0], "message": final[run_id][1]}
                    for run_id, info in soak.runs.items()
                },
                "faults": soak.faults,
                "records": records,
                "had_container": sorted(had),
                "checks": checks,
            },
            indent=1,
        )
    )
    print("\n".join(lines))
    return all(checks.values())


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m soak", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--docker-restart", action="store_true")
    parser.add_argument("--settle-timeout", type=float, default=900)
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=120,
        help="stop sending runs after this long (the report says how many were sent)",
    )
    args = parser.parse_args()
    started = datetime.now(timezone.utc)
    out = ROOT / "test-output" / "soak"
    out.mkdir(parents=True, exist_ok=True)
    soak = Soak(args, out)
    seen = Seen()
    try:
        soak.start()
        soak.drive()
        result = soak.settle(seen, args.settle_timeout)
        seen.stop()
        return 0 if report(soak, result, started, out) else 1
    finally:
        seen.stop()
        soak.stop()


if __name__ == "__main__":
    raise SystemExit(main())
