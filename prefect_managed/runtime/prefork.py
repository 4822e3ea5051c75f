"""The pre-fork executor: `prefect flow-run execute` with Prefect imported once.

Prefect 3.9's executor starts three interpreters per run, each importing Prefect: the
runner (`prefect flow-run execute`), the workspace supervisor (`python -m
prefect.runner._workspace_supervisor`, which runs the pull steps and then replaces itself
with) the engine (`python -m prefect.engine`). This script imports what all three need
once, before any event loop or thread exists, and then:

- forks a *zygote*: an idle copy of the clean, already-imported interpreter;
- runs Prefect's own runner in this process, unchanged, except that the command it
  starts the supervisor with is a small *stub* (a Python started with `-I -S`, no
  Prefect): the stub hands its arguments, environment, working directory and standard
  streams to the zygote, which forks the supervisor. The stub is the process the runner
  watches: it passes the runner's signals on to the supervisor's process group, and ends
  as the supervisor ended (its exit code, or the same signal). If the stub is killed, the
  zygote kills the supervisor's group, as the runner's SIGKILL to the group would;
- in the supervisor, the pull steps run in a short-lived child (they start an event
  loop and threads); the supervisor itself stays clean and, where the stock supervisor
  would `exec` `python -m prefect.engine`, runs the engine in-process with the
  working directory, `sys.argv`, `sys.path`, environment and Prefect settings a new
  interpreter would have had. Its PID and process group are the supervisor's, as with
  `exec`.

It falls back to Prefect's own commands whenever it would not do exactly what they do:
another Prefect version than the one it was written for (for example one installed from
`pip_packages`), threads after the imports, a workspace whose command is not
`python -m prefect.engine` (a uv project, an explicit command), a workspace that shadows
a module already imported here, or Prefect's plugins enabled.

Runs in the runtime image as `python /opt/prefect/prefork.py`; the image's entrypoint
starts it in place of `prefect flow-run execute` unless the run's environment has
`PREFECT_MANAGED_EXECUTOR=stock`. Uses only the standard library and Prefect.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import select
import shutil
import signal
import socket
import struct
import sys
import tempfile

#: The Prefect version whose executor this mirrors; any other runs the stock command.
PREFECT_VERSION = "3.9.1"

STOCK_COMMAND = ["prefect", "flow-run", "execute"]
SUPERVISOR_MODULE = "prefect.runner._workspace_supervisor"
ENGINE_MODULE = "prefect.engine"

#: What the runner, the supervisor and the engine import, imported once here.
PRELOAD = (
    "prefect",
    "prefect.main",
    "prefect.cli",
    "prefect.cli.flow_run",
    "prefect.runner._workspace_supervisor",
    "prefect.runner._workspace_starter",
    "prefect.engine",
    "prefect.flow_engine",
    "prefect.task_engine",
    "prefect._internal.metrics",
    "prefect.deployments.steps",
    "prefect.deployments.steps.core",
    "prefect.deployments.steps.pull",
    "prefect.runner.storage",
)

#: Signals the stub passes on to the supervisor's process group.
FORWARDED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)

STUB = r"""import os, signal, socket, struct, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect({path!r})
body = repr((sys.argv[1:], os.getcwd(), dict(os.environ))).encode()
socket.send_fds(s, [struct.pack("!I", len(body)) + body], [0, 1, 2])
f = s.makefile("rb")
pid = int(f.readline())
def forward(signum, frame):
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass
for signum in {forwarded!r}:
    signal.signal(signum, forward)
def group_alive():
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
try:
    kind, value = f.readline().split()
    value = int(value)
except (OSError, ValueError):
    # The supervisor's waiter is gone without a status: wait for the supervisor instead.
    while group_alive():
        time.sleep(0.1)
    os._exit(1)
if group_alive() and os.fork() == 0:
    # Members of the supervisor's group outlive it (processes the flow left behind): a
    # keeper stays in this group while they live, so the runner's checks of the group
    # see them, its signals to the group reach them, and its SIGKILL (the keeper's
    # connection closes) makes the waiter kill them, as with Prefect's own command.
    while group_alive():
        time.sleep(0.2)
    os._exit(0)
if kind == b"signal":
    if value != signal.SIGKILL:
        try:
            signal.signal(value, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [value])
    os.kill(os.getpid(), value)
    time.sleep(1)
    os._exit(1)
os._exit(value)
"""

#: What the zygote becomes once it has forked the supervisor (`exec`, so it stays the
#: supervisor's parent and drops its copy of Prefect): it reports how the supervisor
#: ended to the stub, and kills the supervisor's group when the stub's side is killed.
WAITER = r"""import os, select, signal, socket, sys
pid, conn = int(sys.argv[1]), socket.socket(fileno=int(sys.argv[2]))
def closed():
    try:
        return not conn.recv(1)
    except OSError:
        return True
def kill_group():
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
try:
    pidfd = os.pidfd_open(pid)
except (AttributeError, OSError):
    pidfd = None
while True:
    watched = [conn] + ([pidfd] if pidfd is not None else [])
    ready, _, _ = select.select(watched, [], [], None if pidfd is not None else 0.05)
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    if conn in ready and closed():
        kill_group()  # the stub was killed: the runner's SIGKILL to its group
        os.waitpid(pid, 0)
        os._exit(0)
if os.WIFSIGNALED(status):
    line = b"signal %d\n" % os.WTERMSIG(status)
else:
    line = b"exit %d\n" % os.waitstatus_to_exitcode(status)
try:
    conn.sendall(line)
except OSError:
    pass
while not closed():  # the stub, or its keeper, still stands for the group
    pass
kill_group()
"""


def stock(reason: str | None = None) -> None:
    """Replace this process with Prefect's own executor."""
    if reason:
        print(
            f"prefect-managed: starting the flow run with Prefect's own executor: {reason}",
            file=sys.stderr,
        )
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(STOCK_COMMAND[0], STOCK_COMMAND + sys.argv[1:])


def fresh_interpreter_signals() -> None:
    """The signal dispositions a new CPython process starts with."""
    for signum in range(1, signal.NSIG):
        if signum in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            signal.signal(signum, signal.SIG_DFL)
        except (OSError, ValueError, RuntimeError):
            pass
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def startup_environment(environment: dict[str, str]) -> dict[str, str]:
    """The variables read once when a process starts (the interpreter's, the dynamic
    loader's, the locale and time zone; PYTHONPATH aside, which `Interpreter.become`
    applies): a process forked from this one started with ours."""
    return {
        key: value
        for key, value in environment.items()
        if key.startswith(("PYTHON", "LD_", "LC_"))
        and key != "PYTHONPATH"
        or key in ("LANG", "LANGUAGE", "TZ")
    }


def site_directories() -> dict[str, float]:
    """The interpreter's package directories and when their entries last changed: a pull
    step that installs or removes a package (`pip_install_requirements`) changes one. The
    user's site directory counts where the interpreter reads it (not in a virtual
    environment): pip installs there when it cannot write the others (the official
    image), and a new interpreter puts it on `sys.path` only if it exists at start."""
    import site
    import sysconfig

    found = {}
    paths = sysconfig.get_paths()
    directories = {paths["purelib"], paths["platlib"], *site.getsitepackages()}
    if site.ENABLE_USER_SITE:
        directories.add(site.getusersitepackages())
    for directory in directories:
        try:
            found[directory] = os.stat(directory).st_mtime
        except OSError:
            pass
    return found


def pythonpath_entries(environment: dict[str, str]) -> list[str]:
    return [entry for entry in environment.get("PYTHONPATH", "").split(os.pathsep) if entry]


def absolute_path(entries: list[str]) -> list[str]:
    """`sys.path` entries as `site` leaves them: absolute (from the current directory),
    each once."""
    seen, result = set(), []
    for entry in entries:
        absolute = os.path.abspath(entry)
        key = os.path.normcase(absolute)
        if key not in seen:
            seen.add(key)
            result.append(absolute)
    return result


class Interpreter:
    """What a new `python -m module` would start with, given its environment."""

    def __init__(self) -> None:
        self.startup = startup_environment(dict(os.environ))
        own = set(absolute_path(pythonpath_entries(dict(os.environ))))
        # This script's own directory first, then PYTHONPATH, then the interpreter's.
        self.base_path = [entry for entry in sys.path[1:] if entry not in own]

    def become(
        self, module_file: str, args: list[str], cwd: str, environment: dict[str, str]
    ) -> None:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environment)
        sys.argv = [module_file, *args]
        sys.orig_argv = [sys.executable, "-m", module_name(module_file), *args]
        # `-m` puts the directory first after `site` has made PYTHONPATH's entries and
        # the interpreter's absolute and unique (so the directory may appear twice).
        sys.path[:] = [
            os.getcwd(),
            *absolute_path([*pythonpath_entries(environment), *self.base_path]),
        ]
        tempfile.tempdir = None  # TMPDIR is read again, as by a new interpreter
        importlib.invalidate_caches()
        from prefect.context import refresh_global_settings_context
        from prefect.logging.configuration import setup_logging

        refresh_global_settings_context()
        # setup_logging adds the `prefect.extra` handlers to the extra loggers each time:
        # the copies from this process's own setup go first.
        extra = logging.getLogger("prefect.extra").handlers
        for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
            if isinstance(logger, logging.Logger) and logger.name != "prefect.extra":
                for handler in [h for h in logger.handlers if h in extra]:
                    logger.removeHandler(handler)
        setup_logging(incremental=False)

    def run_module(self, module: str) -> None:
        """`python -m module` in this process (the caller has called `become`)."""
        import runpy
        import types

        main = types.ModuleType("__main__")
        main.__dict__["__builtins__"] = __builtins__
        sys.modules["__main__"] = main
        # A new interpreter has not imported it before running it as __main__ (and runpy
        # warns when it has).
        sys.modules.pop(module, None)
        runpy._run_module_as_main(module, alter_argv=False)  # type: ignore[attr-defined]


def module_name(module_file: str) -> str:
    """The dotted name of a module of Prefect's, from its file."""
    import prefect

    root = os.path.dirname(os.path.dirname(prefect.__file__))
    relative = os.path.relpath(module_file, root)
    return relative.removesuffix(".py").replace(os.sep, ".")


def shadowed(paths: list[str]) -> str | None:
    """A module imported here that one of `paths` would provide instead, if any."""
    top = {name.partition(".")[0] for name in sys.modules}
    for directory in paths:
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            full = os.path.join(directory, name)
            if os.path.isdir(full):
                # A directory without __init__.py is a namespace portion: it does not
                # shadow a module found further on the path.
                stem = name if os.path.exists(os.path.join(full, "__init__.py")) else ""
            else:
                stem = name.split(".", 1)[0] if name.endswith((".py", ".pyc", ".so")) else ""
            if stem and stem != "__main__" and stem in top:
                return full
    return None


def read_message(conn: socket.socket) -> tuple[object, list[int]]:
    data, fds, _flags, _address = socket.recv_fds(conn, 1 << 20, 8)
    (length,) = struct.unpack("!I", data[:4])
    body = data[4:]
    while len(body) < length:
        chunk = conn.recv(length - len(body))
        if not chunk:
            raise EOFError("the stub closed its connection")
        body += chunk
    import ast

    return ast.literal_eval(body.decode()), fds


def zygote(listener: socket.socket, parent_alive: int) -> tuple | None:
    """Serve one supervisor: returns its request in the supervisor; the zygote becomes
    the supervisor's waiter. None if the runner ended without asking."""
    ready, _, _ = select.select([listener, parent_alive], [], [])
    if listener not in ready:
        return None  # the runner is gone before it asked
    conn, _ = listener.accept()
    listener.close()
    (argv, cwd, environment), fds = read_message(conn)
    pid = os.fork()
    if pid == 0:
        os.close(parent_alive)
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        # Its own session and group (the stock supervisor's start_new_session) before the
        # stub learns the PID it sends the runner's signals to.
        os.setsid()
        conn.sendall(b"%d\n" % os.getpid())
        conn.close()
        return argv, cwd, environment
    for fd in fds:
        os.close(fd)
    os.close(parent_alive)
    os.set_inheritable(conn.fileno(), True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(
        sys.executable,
        [sys.executable, "-I", "-S", "-c", WAITER, str(pid), str(conn.fileno())],
    )


def supervise(request: tuple, interpreter: Interpreter) -> None:
    """The workspace supervisor, then the engine, in this (clean) process."""
    argv, cwd, environment = request
    fresh_interpreter_signals()
    if (
        argv[:2] != ["-m", SUPERVISOR_MODULE]
        or startup_environment(environment) != interpreter.startup
    ):
        os.chdir(cwd)
        os.execvpe(sys.executable, [sys.executable, *argv], environment)
    import prefect.runner._workspace_supervisor as supervisor_module

    interpreter.become(supervisor_module.__file__, argv[2:], cwd, environment)

    # The pull steps start an event loop and threads: they run in a child, which hands
    # back what the stock supervisor would `exec` and ends as `exec` would end it.
    packages = site_directories()
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read_end)

        async def hand_back(command: list[str], *, cwd, environment: dict[str, str]) -> int:
            with os.fdopen(write_end, "w") as out:
                mask = os.umask(0)
                os.umask(mask)
                json.dump(
                    {
                        "command": command,
                        "cwd": str(cwd),
                        "environment": environment,
                        "umask": mask,
                    },
                    out,
                )
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

        supervisor_module._launch_engine = hand_back
        sys.exit(supervisor_module.main(argv[2:]))
    os.close(write_end)
    with os.fdopen(read_end) as handed:
        message = handed.read()
    _, status = os.waitpid(child, 0)
    if not message:  # the pull steps failed or were killed: end as they did
        if os.WIFSIGNALED(status):
            signum = os.WTERMSIG(status)
            if signum != signal.SIGKILL:
                signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        os._exit(os.waitstatus_to_exitcode(status) or 1)
    launch = json.loads(message)
    command, cwd, environment = launch["command"], launch["cwd"], launch["environment"]
    os.chdir(cwd)
    pythonpath = absolute_path(pythonpath_entries(environment))
    os.umask(launch["umask"])  # a pull step's umask stays, as across Prefect's exec
    reason = None
    if command != [sys.executable, "-m", ENGINE_MODULE]:
        reason = "the workspace runs its own command"
    elif startup_environment(environment) != interpreter.startup:
        reason = (
            "the workspace's environment changes variables read when a process starts "
            "(PYTHON*, LD_*, LC_*, LANG, TZ)"
        )
    elif site_directories() != packages:
        reason = "the pull steps installed or removed packages"
    elif (found := shadowed([cwd, *pythonpath])) is not None:
        reason = f"the workspace provides {found}, a module the executor has already imported"
    if reason is not None:
        print(f"prefect-managed: {reason}; starting it as Prefect does", file=sys.stderr)
        sys.stderr.flush()
        os.execvpe(command[0], command, environment)  # in `cwd` already
    import prefect.engine

    interpreter.become(prefect.engine.__file__, [], cwd, environment)
    heartbeats_stop_at_once()
    interpreter.run_module(ENGINE_MODULE)


def heartbeats_stop_at_once() -> None:
    """The engine's heartbeat thread sleeps a whole second at a time (`time.sleep(1)`
    between its checks of its stop event), and Prefect's synchronous engine joins it
    when the flow's run context ends: the engine, and so the run's container and its
    slot, stayed up to a second after the run's final state. Here the heartbeat thread's
    sleep is a wait on that same stop event (found in its loop's closure), so it ends as
    soon as the engine tells it to stop, and Prefect's join returns at once. Nothing else
    changes: the heartbeats are sent when they were, the join still waits for one being
    sent, and every other sleep of the engine module (its main thread's) is the real one.
    A thread whose stop event is not found sleeps as before."""
    import threading
    import time
    import types

    import prefect.flow_engine as flow_engine

    def stop_event(thread: threading.Thread) -> threading.Event | None:
        args = getattr(thread, "_args", ())
        loop = args[0] if args else None
        if getattr(loop, "__name__", "") != "heartbeat_loop":
            return None
        for cell in getattr(loop, "__closure__", None) or ():
            try:
                value = cell.cell_contents
            except ValueError:
                continue
            if isinstance(value, threading.Event):
                return value
        return None

    class EngineTime(types.ModuleType):
        """`time` as the engine module sees it."""

        def __getattr__(self, name: str):
            return getattr(time, name)

        @staticmethod
        def sleep(seconds: float) -> None:
            stop = stop_event(threading.current_thread())
            if stop is None:
                time.sleep(seconds)
            else:
                stop.wait(seconds)

    flow_engine.time = EngineTime("time")


def main() -> None:
    if os.environ.get("PREFECT_MANAGED_EXECUTOR", "prefork") == "stock":
        stock()
    try:
        version = importlib.metadata.version("prefect")
    except importlib.metadata.PackageNotFoundError:
        version = None
    if version != PREFECT_VERSION:
        stock(f"it was written for Prefect {PREFECT_VERSION}, this is {version}")
    if os.environ.get("PREFECT_PLUGINS_ENABLED", "").lower() in ("1", "true", "yes", "on"):
        stock("Prefect's plugins are enabled")
    interpreter = Interpreter()
    import threading

    for module in PRELOAD:
        importlib.import_module(module)
    try:
        tasks = len(os.listdir("/proc/self/task"))  # threads started outside `threading` too
    except OSError:
        tasks = 1
    if threading.active_count() != 1 or tasks != 1:
        stock("importing Prefect started threads")

    private = tempfile.mkdtemp(prefix="prefect-managed-prefork-")
    address = os.path.join(private, "zygote")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(address)
    listener.listen(1)
    stub_path = os.path.join(private, "stub")
    with open(stub_path, "w") as stub:
        stub.write(
            f"#!{sys.executable} -IS\n"
            + STUB.format(path=address, forwarded=[int(s) for s in FORWARDED])
        )
    os.chmod(stub_path, 0o700)
    if os.statvfs(private).f_flag & os.ST_NOEXEC:
        shutil.rmtree(private, ignore_errors=True)
        stock(f"{private} is on a noexec mount")
    alive_read, alive_write = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()

    if os.fork() == 0:
        # The zygote: out of the runner's process group (a `docker stop` reaches the runner
        # alone, as with the stock command), serving one supervisor.
        os.close(alive_write)
        os.setsid()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        request = zygote(listener, alive_read)
        if request is None:
            os._exit(0)
        supervise(request, interpreter)
        return

    os.close(alive_read)
    listener.close()
    import prefect.runner._workspace_starter as starter
    from prefect.cli import app

    starter.get_sys_executable = lambda: stub_path
    script = os.path.join(os.path.dirname(sys.executable), "prefect")
    sys.argv = [script, *STOCK_COMMAND[1:], *sys.argv[1:]]
    sys.path[0] = os.path.dirname(script)  # as for the `prefect` console script
    try:
        sys.exit(app())
    finally:
        shutil.rmtree(private, ignore_errors=True)


if __name__ == "__main__":
    main()
