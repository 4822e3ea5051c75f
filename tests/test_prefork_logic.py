"""The pre-fork executor's pure decisions (prefect_managed/runtime/prefork.py): which
repository files shadow a module it imported, which variables the interpreter reads at
start, and the `-m` name of a module of Prefect's. Its behaviour with a real server and
engine, against Prefect's own command, is in tests/test_executor.py."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import prefect.engine
import pytest

from prefect_managed.executor import PREFORK_VARIABLE, use_prefork
from prefect_managed.runtime import prefork


def test_a_module_file_or_package_of_an_imported_name_shadows(tmp_path):
    (tmp_path / "flows.py").write_text("")
    assert prefork.shadowed([str(tmp_path)]) is None
    (tmp_path / "json.py").write_text("")  # imported (the standard library's) already
    assert prefork.shadowed([str(tmp_path)]) == str(tmp_path / "json.py")


def test_a_package_shadows_but_a_namespace_directory_does_not(tmp_path):
    (tmp_path / "prefect").mkdir()
    assert prefork.shadowed([str(tmp_path)]) is None  # no __init__.py: a namespace portion
    (tmp_path / "prefect" / "__init__.py").write_text("")
    assert prefork.shadowed([str(tmp_path)]) == str(tmp_path / "prefect")


def test_other_files_and_missing_directories_do_not_shadow(tmp_path):
    (tmp_path / "json.txt").write_text("")
    (tmp_path / "os.md").write_text("")
    (tmp_path / ".git").mkdir()
    assert prefork.shadowed([str(tmp_path), str(tmp_path / "missing")]) is None


def test_the_interpreters_start_variables_leave_pythonpath_to_sys_path():
    env = {"PYTHONPATH": "/a", "PYTHONUNBUFFERED": "1", "PATH": "/bin", "PREFECT_X": "1"}
    assert prefork.startup_environment(env) == {"PYTHONUNBUFFERED": "1"}


def test_the_dash_m_name_of_prefects_modules():
    assert prefork.module_name(prefect.engine.__file__) == "prefect.engine"


def test_a_new_interpreters_sys_path_is_its_directory_pythonpath_then_the_interpreters(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(sys, "path", ["/script-dir", "/own-pythonpath", "/usr/lib/python3.11"])
    monkeypatch.setenv("PYTHONPATH", "/own-pythonpath")
    interpreter = prefork.Interpreter()
    assert interpreter.base_path == ["/usr/lib/python3.11"]


def test_path_entries_are_made_absolute_and_unique_as_site_does(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert prefork.absolute_path(["src", str(tmp_path / "src"), "/a/", "/a", "."]) == [
        str(tmp_path / "src"),
        "/a",
        str(tmp_path),
    ]


@pytest.mark.parametrize(
    "image, command, env, uses",
    [
        ("prefecthq/prefect:3-latest", "prefect flow-run execute", {}, True),
        ("docker.io/prefecthq/prefect:3.9.1-python3.12", "prefect flow-run execute", {}, True),
        ("prefect-managed-runtime:3.9.1", "prefect flow-run execute", {}, False),
        ("registry.example/team/flows:1", "prefect flow-run execute", {}, False),
        ("prefecthq/prefect:2-latest", "prefect flow-run execute", {}, False),
        ("prefecthq/prefect:3-latest", "python my_runner.py", {}, False),
        ("prefecthq/prefect:3-latest", None, {}, False),
        (
            "prefecthq/prefect:3-latest",
            "prefect flow-run execute",
            {"PREFECT_MANAGED_EXECUTOR": "stock"},
            False,
        ),
    ],
    ids=[
        "official",
        "official by digest of docker.io",
        "runtime image",
        "another image",
        "Prefect 2",
        "another command",
        "no command",
        "the run's switch",
    ],
)
def test_the_worker_gives_only_official_image_runs_of_prefects_command_the_executor(
    image, command, env, uses
):
    before = dict(env)
    started = use_prefork(image, command, env)
    if not uses:
        assert started is None and env == before
        return
    assert shlex.split(started)[:2] == ["python", "-c"]
    assert env[PREFORK_VARIABLE] == Path(prefork.__file__).read_text()


def test_the_bootstrap_runs_the_source_as_main_without_its_variable(tmp_path):
    """What `python -c` runs in the container: the source from the environment, as the
    main module, and the variable gone before the runner and its children read it."""
    env: dict[str, str | None] = {}
    command = use_prefork("prefecthq/prefect:3-latest", "prefect flow-run execute", env)
    env[PREFORK_VARIABLE] = (
        "import os, sys\n"
        "print(__name__, sys.argv, os.environ.get('PREFECT_MANAGED_PREFORK', 'gone'))\n"
    )
    argv = [sys.executable, *shlex.split(command)[1:], "--extra"]
    out = subprocess.run(
        argv, env={**os.environ, **env}, capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["__main__", "['-c',", "'--extra']", "gone"]


def test_the_heartbeat_thread_stops_when_told_not_a_second_later(monkeypatch):
    """Prefect's synchronous engine joins its heartbeat thread when the flow's run context
    ends, and the thread sleeps a whole second between its checks of its stop event. With
    the executor's change its sleep is a wait on that event: the thread sleeps no more
    (the engine's other sleeps are real ones), it has ended when the context does (the
    join still waits for it), and it sent its one heartbeat and none after. The engine
    looks `_send_heartbeats` and `time` up in its module, so the change reaches them."""
    import threading
    import time
    from types import SimpleNamespace

    import prefect.flow_engine as flow_engine

    run_context = flow_engine.FlowRunEngine.run_context.__wrapped__  # under @contextmanager
    assert "_send_heartbeats" in run_context.__code__.co_names
    monkeypatch.setattr(flow_engine, "time", flow_engine.time)  # restored after the test
    sent: list[str] = []
    slept: list[str] = []
    real_sleep = time.sleep

    def recorded_sleep(seconds: float) -> None:
        slept.append(threading.current_thread().name)
        real_sleep(seconds)

    monkeypatch.setattr(time, "sleep", recorded_sleep)
    engine = SimpleNamespace(
        heartbeat_seconds=30,
        flow_run=SimpleNamespace(state=None),
        logger=SimpleNamespace(debug=lambda *args, **kwargs: None),
        _build_heartbeat_event_template=lambda: ("resource", "related"),
        _emit_flow_run_heartbeat=lambda resource, related: sent.append(resource),
    )

    def heartbeat_thread_after_the_context() -> threading.Thread:
        before = set(threading.enumerate())
        with flow_engine._send_heartbeats(engine):
            deadline = time.monotonic() + 10
            while not sent and time.monotonic() < deadline:  # the first is sent at once
                real_sleep(0.001)
            (thread,) = set(threading.enumerate()) - before
            while thread.name not in slept and time.monotonic() < deadline:
                real_sleep(0.001)  # it sleeps out its second (Prefect's own) or waits
        return thread

    stock = heartbeat_thread_after_the_context()
    assert stock.name in slept and not stock.is_alive() and sent == ["resource"]
    prefork.heartbeats_stop_at_once()
    sent.clear()
    slept.clear()
    before = set(threading.enumerate())
    with flow_engine._send_heartbeats(engine):
        (changed,) = set(threading.enumerate()) - before
        flow_engine.time.sleep(0.01)  # the main thread's sleep is the real one
        deadline = time.monotonic() + 10
        while not sent and time.monotonic() < deadline:
            real_sleep(0.001)
    assert not changed.is_alive() and sent == ["resource"]
    assert slept == [threading.current_thread().name], slept
