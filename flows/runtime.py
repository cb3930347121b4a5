"""The Prefect runtime of a dareflow command: its temporary Prefect server, which exits
when the command's process dies, and how failures read in a run's log.

Without ``PREFECT_API_URL`` Prefect runs flows against a temporary ("ephemeral") API
server, a ``uvicorn`` child process started on first use and stopped at interpreter
exit. A command killed with SIGKILL (or by the OOM killer) never reaches its exit
handlers, and the server (~230 MB) lived on under pid 1, one per kill.
:func:`guard_temporary_server` makes Prefect start that server through this module
instead (``python -m dareflow.flows.runtime PARENT_PID UVICORN_ARGS...``): a thread in
the server watches its parent and shuts the server down once the parent is gone. A
watched parent pid rather than ``PR_SET_PDEATHSIG``: that signal follows the *thread*
that started the child (Prefect may start the server from a worker thread that ends
long before the command), and it exists on Linux only.

Every dareflow flow also calls :func:`one_line_failures` first: a failure is one line in
the run's log, not Prefect's three reports of the same exception with their tracebacks.

The temporary server also sends no usage telemetry unless the user asked for it
(``PREFECT_SERVER_ANALYTICS_ENABLED``): offline, every run printed ``Failed to send
telemetry``.

A ``dareflow`` command process starts that server itself, first thing
(:func:`start_temporary_server`): it takes ~4 s to answer (its imports, the database
check, its services), which Prefect's lazy start added to every command after the
command's own ~3 s of imports. Started in the background, the two overlap; the command
names the server in ``PREFECT_API_URL`` and waits for it (:func:`api_ready`) only where a
flow is about to run, so a bad recipe is still refused without waiting.
"""

import atexit
import collections
import importlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any

#: How often the server checks that the command that started it is alive (seconds).
PARENT_POLL_S = 0.25
#: How long the server may take to shut down gracefully once its parent is gone.
SHUTDOWN_GRACE_S = 5.0
#: Modules Prefect imports only as a flow run starts (``fastapi.encoders``, for the flow
#: run's parameters: 0.12 s; the flow and task engines), imported by :func:`api_ready`
#: while the temporary server is still starting.
FLOW_RUN_IMPORTS = ("fastapi.encoders", "prefect.flow_engine", "prefect.task_engine",
                    "prefect.utilities.visualization")
#: How often :func:`api_ready` asks a starting server for its health (seconds).
HEALTH_POLL_S = 0.05
#: uvicorn's exit code when its port is taken (started again on another port), or when
#: the app failed to start (an error).
PORT_TAKEN = 3
#: How long a starting server may take to answer, unless
#: ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` says otherwise (Prefect's default).
STARTUP_TIMEOUT_S = 20.0


class ServerStartError(OSError):
    """The command's temporary Prefect server did not come up (an ``error:`` line)."""


class TemporaryServer:
    """The temporary Prefect server of one command, started in the background.

    Runs Prefect's own server command (:func:`server_command`) on a free port of
    127.0.0.1. :meth:`wait` blocks until it answers; :meth:`stop` ends it without waiting
    for its graceful shutdown (it watches this process anyway).
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.started = time.monotonic()
        self.process = subprocess.Popen(server_command(self.port), env=server_environment())
        self.ready = False

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def wait(self, timeout: float) -> None:
        """Block until the server answers ``/health``; start it again on another port if
        its port was taken meanwhile (then ``PREFECT_API_URL`` follows it).

        Raises:
            ServerStartError: it exited, or did not answer within ``timeout`` seconds of
                its start (then it is stopped).
        """
        deadline = self.started + timeout
        while not self.ready:
            code = self.process.poll()
            # uvicorn also exits with 3 when the app fails to start: then the port is free
            if code == PORT_TAKEN and not port_free(self.port):
                self.port = free_port()
                self.process = subprocess.Popen(server_command(self.port),
                                                env=server_environment())
                use_api(self.api_url)
                continue
            if code is not None:
                raise ServerStartError(
                    f"the temporary Prefect server (127.0.0.1:{self.port}) exited with code "
                    f"{code} before it answered; its error is printed above. Fix it, or "
                    "run a Prefect server (prefect server start) and set PREFECT_API_URL "
                    "to its API (http://127.0.0.1:4200/api)")
            try:
                with urllib.request.urlopen(self.api_url + "/health", timeout=1):
                    self.ready = True
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise ServerStartError(
                        f"the temporary Prefect server (127.0.0.1:{self.port}) did not "
                        f"answer within {timeout:g} s; on a loaded machine raise "
                        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or run a Prefect "
                        "server (prefect server start) and set PREFECT_API_URL to its API"
                    ) from None
                time.sleep(HEALTH_POLL_S)

    def stop(self) -> None:
        """End the server without waiting for it: SIGTERM (uvicorn's graceful shutdown)
        once it answered; SIGKILL before that, where it served nothing. A server stopped
        in the middle of its start-up (a command that refused its input at once) printed
        Prefect's "Reactive triggers not started" traceback from its failed shutdown;
        SQLite's journal keeps its database whole either way."""
        if self.process.poll() is None:
            if self.ready:
                self.process.terminate()
            else:
                self.process.kill()


#: The server :func:`start_temporary_server` started in this process, if any.
_SERVER: TemporaryServer | None = None


def start_temporary_server() -> TemporaryServer | None:
    """Start this command's temporary Prefect server now, in the background, and name it
    in ``PREFECT_API_URL``; :func:`api_ready` waits for it.

    Only for a process that has not imported Prefect yet (a ``dareflow`` command) and has
    no Prefect API: with ``PREFECT_API_URL`` set (the environment, a Prefect profile,
    ``prefect.toml``) nothing is started (a server started before the settings were read is
    stopped unused). A process that already imported Prefect (a caller of
    ``dareflow.cli.main``, tests) keeps Prefect's lazily started server, guarded by
    :func:`guard_temporary_server`, which every command there shares.

    Returns:
        The server, or None where Prefect's API is another one.
    """
    global _SERVER
    if os.environ.get("PREFECT_API_URL"):
        return None
    if "prefect" in sys.modules:
        guard_temporary_server()
        return None
    server = TemporaryServer()  # before Prefect's imports (~1 s): they overlap its start
    atexit.register(server.stop)  # registered before Prefect's: runs after its log flushes
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():  # from a profile or prefect.toml
        server.stop()
        return None
    use_api(server.api_url)
    _SERVER = server
    return server


def api_ready() -> None:
    """Wait until the temporary server of :func:`start_temporary_server` answers (a no-op
    without one, and once it did). Called where a command is about to run a flow; the
    modules Prefect imports only as the flow run starts load first, while it starts.

    Raises:
        ServerStartError: it did not start (see :meth:`TemporaryServer.wait`).
    """
    if _SERVER is None or _SERVER.ready:
        return
    for module in FLOW_RUN_IMPORTS:
        importlib.import_module(module)
    timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
                                   STARTUP_TIMEOUT_S))
    _SERVER.wait(timeout)
    without_flow_heartbeats()


def without_flow_heartbeats() -> None:
    """Run this process's flows without Prefect's flow-run heartbeats.

    A heartbeat tells a long-lived server that a flow run is alive, so that it can mark a
    silent one crashed. The temporary server lives exactly as long as this command, so
    nobody reads them; and each flow run ended by joining its heartbeat thread, which
    sleeps in 1 s steps: 0 to 1 s (0.9 s measured) between a flow's last task and its
    end. Only where this process started its own server (a server named in
    ``PREFECT_API_URL`` keeps them). A copy of the settings with the one field replaced
    (``Settings.copy_with_update`` would read the profile and validate every setting
    again: 45 ms, after the server answered).
    """
    import prefect.context

    current = prefect.context.GLOBAL_SETTINGS_CONTEXT
    flows = current.settings.flows.model_copy(update={"heartbeat_frequency": None})
    prefect.context.GLOBAL_SETTINGS_CONTEXT = prefect.context.SettingsContext(
        profile=current.profile, settings=current.settings.model_copy(update={"flows": flows}))


def use_api(url: str) -> None:
    """Point this process's Prefect (and its child processes) at the API ``url``."""
    os.environ["PREFECT_API_URL"] = url
    if "prefect.context" in sys.modules:  # Prefect read its settings at import
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()


def port_free(port: int) -> bool:
    """Whether ``port`` of 127.0.0.1 can be bound now."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A port of 127.0.0.1 free now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def guard_temporary_server() -> Any | None:
    """Make this process's temporary Prefect server (if it needs one) exit with it.

    Installs a :class:`prefect.server.api.server.SubprocessASGIServer` subclass as the
    instance Prefect's client starts on first use (Prefect keeps one per port, and
    ``get_client()`` asks for the default one); nothing starts here. A no-op when
    ``PREFECT_API_URL`` names a server, and when the temporary server was created
    before this call (it is then left as it is).

    Returns:
        The temporary server instance (started or not), or None with an API URL.
    """
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    # cost: ~2 s of imports (FastAPI app, database), paid only without an API URL,
    # where Prefect imports the same module to start its server anyway
    from prefect.server.api.server import SubprocessASGIServer

    class GuardedServer(SubprocessASGIServer):
        """Prefect's temporary server, started so that it exits when this process dies."""

        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            return subprocess.Popen(server_command(self.port), env=server_environment())

    # the default instance (port None) is what get_client() starts; the constructor
    # returns an existing one unchanged
    return GuardedServer()


def server_command(port: int | None) -> list[str]:
    """The temporary server's command line: Prefect 3.8's own (``SubprocessASGIServer.
    _run_uvicorn_command``: uvicorn serving ``create_app`` on 127.0.0.1, errors only),
    run under :func:`main` with this process as the parent to watch."""
    import importlib.util

    # Prefect's package folder's parent, found without importing Prefect (~1 s)
    spec = importlib.util.find_spec("prefect")
    app_dir = os.path.dirname(os.path.dirname(spec.origin))
    return [sys.executable, "-m", "dareflow.flows.runtime", str(os.getpid()),
            "--app-dir", app_dir,
            "--factory", "prefect.server.api.server:create_app",
            "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "error", "--lifespan", "on"]


#: Prefect's settings that make a starting server register every known block type (or
#: check, by a hash of the registry, whether it must): both off for the temporary server
#: unless the environment sets one of them (by any of its names; the server has no UI
#: to list block types, and a block saved later registers its own type).
REGISTER_BLOCKS_SETTINGS = ("PREFECT_SERVER_REGISTER_BLOCKS_ON_START",
                            "PREFECT_SERVER_MEMOIZE_BLOCK_AUTO_REGISTRATION")
REGISTER_BLOCKS_ALIASES = REGISTER_BLOCKS_SETTINGS + ("PREFECT_API_BLOCKS_REGISTER_ON_START",
                                                      "PREFECT_MEMOIZE_BLOCK_AUTO_REGISTRATION")


def server_environment() -> dict[str, str]:
    """The temporary server's environment, as Prefect builds it (no UI; where Prefect is
    imported, this process's explicitly set Prefect settings; otherwise the server reads
    the same environment and profile), with usage telemetry and block-type registration
    off unless set."""
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT__SERVER_FINAL": "1"}
    if "prefect.settings" in sys.modules:
        from prefect.settings import get_current_settings

        env.update(get_current_settings().to_environment_variables(exclude_unset=True))
    env.pop("PREFECT_API_URL", None)  # restarted on another port: not the URL it had
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if not any(name in env for name in REGISTER_BLOCKS_ALIASES):
        # the check alone imports every installed Prefect collection and hashes the
        # block registry: ~0.4 s of the server's ~4.7 s start on 2 cores
        env.update(dict.fromkeys(REGISTER_BLOCKS_SETTINGS, "false"))
    return env


def watch_parent(parent: int) -> None:
    """Block until ``parent`` is no longer this process's parent, then end the process:
    SIGTERM first (uvicorn's graceful shutdown), a hard exit if that takes too long."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(SHUTDOWN_GRACE_S)
    os._exit(1)


#: Prefect's loggers of flow and task runs: what a run's log in the UI shows.
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class OneLineFailures(logging.Filter):
    """One line per failure in a run's log, the traceback at debug level.

    Prefect's engine logs a failed task's exception in full with its traceback, again in
    the task's final state, then again with a longer traceback when the flow run stops:
    a gate refusal (~900 characters) came out three times, twice with a traceback.
    Installed on the run loggers (:func:`one_line_failures`):

    - an error with an exception becomes one line, ``<Type>: <message>`` (newlines
      folded), followed by its traceback as a DEBUG record where the logger allows
      debug (``PREFECT_LOGGING_LEVEL=DEBUG``);
    - the flow run's report of an exception a task already reported in this process
      names the task instead of repeating the message;
    - ``Finished in state Failed(...)`` / ``Crashed(...)`` keeps its state name only.
    """

    def __init__(self) -> None:
        super().__init__()
        # (type, message) -> task run name, of the exceptions tasks reported lately
        self._reported: collections.OrderedDict[tuple[str, str], str] = (
            collections.OrderedDict())

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not record.name.startswith(RUN_LOGGERS):
            return True
        if str(record.msg).startswith(("Finished in state Failed", "Finished in state Crashed")):
            state = str(record.msg).split("(", 1)[0].removeprefix("Finished in state ")
            record.msg, record.args = f"Finished in state {state.strip()}", ()
            return True
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return True
        logger = logging.getLogger(record.name)
        logger.callHandlers(self._one_line(record, exc))
        if logger.isEnabledFor(logging.DEBUG):
            logger.callHandlers(logging.makeLogRecord({
                **record.__dict__, "levelno": logging.DEBUG, "levelname": "DEBUG",
                "msg": "traceback of the error above", "args": ()}))
        return False

    def _one_line(self, record: logging.LogRecord, exc: BaseException) -> logging.LogRecord:
        text = " ".join(str(exc).split("\n")).strip()
        ident = (type(exc).__name__, text)
        task = getattr(record, "task_run_name", None)
        if record.name.startswith("prefect.task_runs") and task:
            self._reported[ident] = task
            while len(self._reported) > 64:
                self._reported.popitem(last=False)
            line = f"{type(exc).__name__}: {text}"
        elif ident in self._reported:
            line = (f"stopped: task run {self._reported[ident]!r} failed with "
                    f"{type(exc).__name__} (its message is in its log)")
        else:
            line = f"{type(exc).__name__}: {text}"
        return logging.makeLogRecord({**record.__dict__, "msg": line, "args": (),
                                      "exc_info": None, "exc_text": None})


def one_line_failures() -> None:
    """Install :class:`OneLineFailures` on the run loggers of this process (once)."""
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, OneLineFailures) for f in logger.filters):
            logger.addFilter(_FAILURES)


_FAILURES = OneLineFailures()


def one_app_per_process() -> None:
    """Key Prefect's app caches by a constant in the temporary server's process.

    ``create_app`` and ``create_api_app`` cache the apps they build by a hash of every
    Prefect setting (``Settings.hash_key``: 0.1 s each on this machine, both on the
    server's way to its first answer), so that a process building apps under different
    settings gets one per settings. The temporary server's process builds one app, once.
    """
    from prefect.settings.models.root import Settings

    Settings.hash_key = lambda self: "dareflow-temporary-server"


def main(argv: list[str]) -> None:
    """``python -m dareflow.flows.runtime PARENT_PID UVICORN_ARGS...``: uvicorn, as
    ``python -m uvicorn UVICORN_ARGS...`` runs it, for as long as PARENT_PID lives."""
    parent = int(argv[0])
    threading.Thread(target=watch_parent, args=(parent,), name="dareflow-parent-watch",
                     daemon=True).start()
    one_app_per_process()
    from uvicorn.main import main as uvicorn_main

    uvicorn_main(args=argv[1:], prog_name="uvicorn")  # exits (3: port taken, Prefect retries)


if __name__ == "__main__":
    main(sys.argv[1:])
