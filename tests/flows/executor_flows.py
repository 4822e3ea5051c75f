"""Probe flows for the executor's differential tests (tests/test_executor.py): each logs
what it saw as one JSON line (`OBSERVED ...`), and its hooks log one line each."""

import asyncio
import ctypes
import faulthandler
import json
import locale
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings

from prefect import flow, get_run_logger
from prefect.settings import get_current_settings


def _handler(handler: object) -> str:
    if handler == signal.SIG_DFL:
        return "default"
    if handler == signal.SIG_IGN:
        return "ignore"
    if handler is None:
        return "none"
    return getattr(handler, "__qualname__", type(handler).__name__)


def _logger(name: str | None) -> dict:
    logger = logging.getLogger(name)
    return {
        "level": logger.level,
        "propagate": logger.propagate,
        "handlers": sorted(type(h).__name__ for h in logger.handlers),
    }


def observe() -> dict:
    """What the flow sees of its process."""
    return {
        "cwd": os.getcwd(),
        "sys.path": sys.path,
        "sys.argv": sys.argv,
        "sys.orig_argv": sys.orig_argv,
        "sys.flags": repr(sys.flags),
        "gc frozen": __import__("gc").get_freeze_count(),
        "gc enabled": __import__("gc").isenabled(),
        "gc thresholds": __import__("gc").get_threshold(),
        "environment": dict(os.environ),
        "settings": get_current_settings().to_environment_variables(exclude_unset=True),
        "signals": {
            signal.Signals(signum).name: _handler(signal.getsignal(signum))
            for signum in (
                signal.SIGINT,
                signal.SIGTERM,
                signal.SIGHUP,
                signal.SIGPIPE,
                signal.SIGCHLD,
                signal.SIGUSR1,
                signal.SIGXFSZ,
                signal.SIGALRM,
            )
        },
        "blocked": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
        "session leader": os.getsid(0) == os.getpid(),
        "group leader": os.getpgid(0) == os.getpid(),
        "main module": getattr(sys.modules["__main__"], "__spec__", None) is not None
        and sys.modules["__main__"].__spec__.name,
        "logging": {
            name or "root": _logger(name)
            for name in (None, "prefect", "prefect.flow_runs", "probe_extra")
        },
        "tempdir": tempfile.gettempdir(),
        "stdout unbuffered": not sys.stdout.line_buffering and os.environ.get("PYTHONUNBUFFERED"),
        "umask": _umask(),
        "warnings filters": [repr(f) for f in warnings.filters],
        "recursion limit": sys.getrecursionlimit(),
        "switch interval": sys.getswitchinterval(),
        "faulthandler": faulthandler.is_enabled(),
        "encodings": [sys.stdout.encoding, sys.stderr.encoding, sys.getfilesystemencoding()],
        "locale": locale.setlocale(locale.LC_ALL),
        "stdin": _stdin(),
        # Not compared: the pre-fork executor has imported Prefect's CLI before the fork.
        "preloaded": "prefect.cli.flow_run" in sys.modules,
    }


def _stdin() -> str:
    try:
        return f"{os.fstat(0).st_mode:o} inheritable={os.get_inheritable(0)}"
    except OSError as exc:
        return f"closed ({exc.errno})"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _report(logger, name: str):
    logger.info(
        "OBSERVED %s", json.dumps({"probe": name, **observe()}, sort_keys=True, default=str)
    )


def _hook(kind: str):
    def hook(flow, flow_run, state):
        # Hooks run in the runner (crash, cancel) or the engine (failure, completion):
        # a line in the run's logs each time one runs.
        logging.getLogger("prefect.flow_runs").warning("HOOK %s %s", kind, state.name)
        print(f"HOOK {kind} {state.name}", flush=True)

    return hook


HOOKS = {
    "on_completion": [_hook("completion")],
    "on_failure": [_hook("failure")],
    "on_cancellation": [_hook("cancellation")],
    "on_crashed": [_hook("crashed")],
}


@flow(**HOOKS)
def ordinary() -> str:
    _report(get_run_logger(), "ordinary")
    return "done"


@flow(**HOOKS)
def imports_webbrowser() -> str:
    """Imports a module the pre-fork executor has imported before the fork; the
    repository this flow comes from in the shadowing test has its own."""
    import webbrowser

    _report(get_run_logger(), "imports_webbrowser")
    found = getattr(webbrowser, "SHADOW", "the standard library's")
    get_run_logger().info("WEBBROWSER %s", found)
    return found


@flow(**HOOKS)
def failing() -> None:
    _report(get_run_logger(), "failing")
    raise ValueError("the probe fails on purpose")


@flow(**HOOKS)
async def asynchronous() -> str:
    await asyncio.sleep(0.1)
    _report(get_run_logger(), "asynchronous")
    return "done"


@flow
def child(value: int) -> int:
    return value * 2


@flow(**HOOKS)
def parent() -> int:
    _report(get_run_logger(), "parent")
    return child(21)


@flow(retries=1, retry_delay_seconds=1, **HOOKS)
def retrying() -> str:
    from prefect.runtime import flow_run

    if flow_run.run_count < 2:
        raise RuntimeError(f"attempt {flow_run.run_count} fails")
    return f"attempt {flow_run.run_count}"


@flow(**HOOKS)
def waits(seconds: float = 300.0) -> None:
    get_run_logger().info("WAITING")
    time.sleep(seconds)


@flow(**HOOKS)
def exits(code: int = 3) -> None:
    get_run_logger().info("EXITING")
    os._exit(code)


@flow(**HOOKS)
def kills_itself() -> None:
    get_run_logger().info("KILLING")
    os.kill(os.getpid(), signal.SIGKILL)


@flow(**HOOKS)
def segfaults() -> None:
    get_run_logger().info("SEGFAULTING")
    ctypes.string_at(0)


@flow(**HOOKS)
def eats_memory(megabytes: int = 2048) -> None:
    get_run_logger().info("ALLOCATING")
    blocks = []
    for _ in range(megabytes):
        blocks.append(bytearray(1024 * 1024))


@flow(**HOOKS)
def leaves_a_child(seconds: float = 300.0) -> None:
    """Starts a process that ignores SIGTERM (in the flow's process group) and waits."""
    subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 600"])
    get_run_logger().info("WAITING")
    time.sleep(seconds)
