"""A ``dareflow`` command's temporary Prefect server (``dareflow.flows.runtime``): started
in the background as the command starts, named in ``PREFECT_API_URL``, waited for where a
flow runs; a server that does not come up is one clear ``error:`` line.

Each case runs in a fresh Python process (what a command is): the test process has
imported Prefect, where the command keeps Prefect's own lazily started server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from dareflow.flows import runtime
from tests.flows.conftest import write_recipe

ROOT = Path(__file__).resolve().parents[2]

#: Merges the recipe of argv[1] into argv[2] as ``dareflow merge`` does: server first.
MERGE_SCRIPT = """
import json, os, sys
from dareflow.flows import runtime

prefect_before = "prefect" in sys.modules
server = runtime.start_temporary_server()
seen = {"env_url": os.environ["PREFECT_API_URL"], "server_url": server.api_url,
        "alive_at_start": server.process.poll() is None, "prefect_before": prefect_before}
from dareflow.flows.merge import run_merge
from prefect import get_client
from prefect.settings import PREFECT_API_URL, get_current_settings

seen["imported_early"] = [m for m in runtime.FLOW_RUN_IMPORTS if m in sys.modules]

seen["settings_url"] = PREFECT_API_URL.value()
manifest = run_merge(sys.argv[1], sys.argv[2], store=sys.argv[3], max_workers=1)
seen["heartbeat"] = get_current_settings().flows.heartbeat_frequency
seen["url_after"] = PREFECT_API_URL.value()
seen["imported_late"] = [m for m in runtime.FLOW_RUN_IMPORTS if m in sys.modules]
with get_client(sync_client=True) as client:
    run = client.read_flow_run(manifest["flow_run_id"])
    block_types = len(client.read_block_types())
seen.update(ready=server.ready, state=run.state.type.value, flow_run=run.name,
            server_pid=server.process.pid, shards=len(manifest["shards"]),
            server_module_imported="prefect.server.api.server" in sys.modules,
            block_types=block_types)
print(json.dumps(seen))
"""


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), DAREFLOW_CACHE=str(tmp_path / "cache"),
               **extra)
    return env


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


def _recipe(pico_family: dict[str, Path], tmp_path: Path) -> Path:
    return write_recipe(tmp_path / "r.yaml", {
        "merge_method": "task_arithmetic", "base_model": str(pico_family["base"]),
        "models": [{"model": str(pico_family["a"]), "parameters": {"weight": 0.5}}],
        "dtype": "float32"})


def test_command_starts_its_server_first_and_its_flow_runs_there(pico_family, tmp_path):
    recipe = _recipe(pico_family, tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", MERGE_SCRIPT, str(recipe), str(tmp_path / "out"),
         str(tmp_path / "store")], env=_env(tmp_path), cwd=ROOT, capture_output=True, check=False,
        text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    # started in a process without Prefect yet, and every part of Prefect points at it
    assert seen["prefect_before"] is False
    assert seen["alive_at_start"] is True
    assert seen["env_url"] == seen["server_url"] == seen["settings_url"]
    assert seen["server_url"].startswith("http://127.0.0.1:")
    # the flow ran against it once it answered; Prefect never started a server of its own
    # (its server module, ~2 s of imports, is not even imported here)
    assert seen["ready"] is True
    assert (seen["state"], seen["flow_run"], seen["shards"]) == ("COMPLETED", "out (task_arithmetic)", 4)
    assert seen["server_module_imported"] is False
    # what Prefect imports only as a flow run starts is not imported by the command's own
    # imports; it was loaded while the server started
    assert seen["imported_early"] == []
    assert seen["imported_late"] == list(runtime.FLOW_RUN_IMPORTS)
    assert "Starting temporary server" not in proc.stderr
    # it registered no block types as it started, nor checked whether it had to (that
    # check imports every Prefect collection, then records its hash in the memo store)
    assert seen["block_types"] == 0
    assert not (tmp_path / "prefect" / "memo_store.toml").exists()
    # and its flow runs send no heartbeats: nobody reads them, and each flow run ended
    # by joining their thread (0-1 s)
    assert seen["heartbeat"] is None
    assert seen["url_after"] == seen["server_url"]  # the rest of the settings as they were
    # and it ends with the command
    assert _gone(seen["server_pid"], within=10)


def test_server_that_fails_to_start_is_one_error_line(pico_family, tmp_path):
    recipe = _recipe(pico_family, tmp_path)
    broken = f"sqlite+aiosqlite:///{tmp_path}/no-such-folder/prefect.db"  # cannot be created
    proc = subprocess.run(
        [sys.executable, "-m", "dareflow.cli", "merge", str(recipe), "--out",
         str(tmp_path / "out")], env=_env(tmp_path, PREFECT_API_DATABASE_CONNECTION_URL=broken),
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("error: the temporary Prefect server (127.0.0.1:")
    assert errors[0].endswith(
        ") exited with code 3 before it answered; its error is printed above. Fix it, or "
        "run a Prefect server (prefect server start) and set PREFECT_API_URL to its API "
        "(http://127.0.0.1:4200/api)")
    assert "unable to open database file" in proc.stderr  # the server's error, above
    assert not (tmp_path / "out").exists()


TIMEOUT_SCRIPT = """
import json, sys
from dareflow.flows import runtime

server = runtime.start_temporary_server()
try:
    server.wait(0.001)
except runtime.ServerStartError as e:
    print(json.dumps({"error": str(e), "pid": server.process.pid, "port": server.port,
                      "stopped": server.process.wait(10) is not None}))
"""


def test_server_that_answers_too_late_is_stopped_with_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-c", TIMEOUT_SCRIPT], env=_env(tmp_path),
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["error"] == (
        f"the temporary Prefect server (127.0.0.1:{seen['port']}) did not answer within "
        "0.001 s; on a loaded machine raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,"
        " or run a Prefect server (prefect server start) and set PREFECT_API_URL to its API")
    assert seen["stopped"] is True


NAMED_API_SCRIPT = """
import json, os, sys
from dareflow.flows import runtime

server = runtime.start_temporary_server()
runtime.api_ready()
prefect_imported = "prefect" in sys.modules
from prefect.settings import get_current_settings

print(json.dumps({"server": server is None and "none", "prefect": prefect_imported,
                  "url": os.environ["PREFECT_API_URL"],
                  "heartbeat": get_current_settings().flows.heartbeat_frequency}))
"""


def test_named_api_starts_no_server(tmp_path):
    proc = subprocess.run([sys.executable, "-c", NAMED_API_SCRIPT],
                          env=_env(tmp_path, PREFECT_API_URL="http://127.0.0.1:9/api"),
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    # a named server keeps Prefect's flow-run heartbeats (it may mark silent runs crashed)
    assert json.loads(proc.stdout) == {"server": "none", "prefect": False,
                                       "url": "http://127.0.0.1:9/api", "heartbeat": 180}


#: Starts the server and prints how long it took to answer (seconds).
READY_SCRIPT = """
import time
from dareflow.flows import runtime

server = runtime.start_temporary_server()
runtime.api_ready()
print(time.monotonic() - server.started)
"""

#: Starts the server, leaves argv[1] seconds after its start without running a flow (a
#: refused recipe).
EARLY_EXIT_SCRIPT = """
import sys, time
from dareflow.flows import runtime

server = runtime.start_temporary_server()
time.sleep(max(server.started + float(sys.argv[1]) - time.monotonic(), 0))
print(server.process.pid)
"""


def test_command_that_leaves_during_the_server_start_prints_nothing_of_it(tmp_path):
    # CI caught it: a recipe refused ~3 s into the server's start-up got Prefect's
    # "Reactive triggers not started" traceback from the server's shutdown. The window is
    # the app's lifespan start, the last second or so before the server answers (0.5 to
    # 0.7 s before it on the machine that found it): leave at points across that second.
    def run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", script, *args], env=_env(tmp_path),
                              cwd=ROOT, capture_output=True, text=True, timeout=120,
                              check=False)

    for _ in range(2):  # the first start in a new Prefect home also creates its database
        ready = run(READY_SCRIPT)
        assert ready.returncode == 0, ready.stderr
    answered = float(ready.stdout.strip())
    for before in (0.9, 0.7, 0.5, 0.3):
        delay = f"{max(answered - before, 0.1):.2f}"
        proc = run(EARLY_EXIT_SCRIPT, delay)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == "", (delay, proc.stderr)
        assert _gone(int(proc.stdout.strip()), within=10), delay


def test_server_registers_block_types_where_the_environment_asks(monkeypatch):
    from dareflow.flows import runtime

    for name in runtime.REGISTER_BLOCKS_ALIASES:
        monkeypatch.delenv(name, raising=False)
    env = runtime.server_environment()
    assert {name: env[name] for name in runtime.REGISTER_BLOCKS_SETTINGS} == {
        "PREFECT_SERVER_REGISTER_BLOCKS_ON_START": "false",
        "PREFECT_SERVER_MEMOIZE_BLOCK_AUTO_REGISTRATION": "false"}
    # a user's own choice, by any of Prefect's names, stands
    for name in runtime.REGISTER_BLOCKS_ALIASES:
        monkeypatch.setenv(name, "true")
        env = runtime.server_environment()
        assert env[name] == "true"
        assert all(env.get(other) != "false" for other in runtime.REGISTER_BLOCKS_ALIASES)
        monkeypatch.delenv(name)


ONE_APP_SCRIPT = """
import json
from dareflow.flows import runtime
from prefect.server.api.server import create_app
from prefect.settings import PREFECT_SERVER_CORS_ALLOWED_ORIGINS, get_current_settings, temporary_settings

runtime.one_app_per_process()
app = create_app(ephemeral=True, final=True)
with temporary_settings({PREFECT_SERVER_CORS_ALLOWED_ORIGINS: "http://example.invalid"}):
    again = create_app(ephemeral=True, final=True)
    key = get_current_settings().hash_key()
paths = {route.path for route in app.routes}
print(json.dumps({"same_app": again is app, "key": key, "api": "/api" in paths}))
"""


def test_temporary_servers_process_keys_its_one_app_by_a_constant(tmp_path):
    # the server's process builds one app: Prefect's app caches get a constant key instead
    # of two hashes of every setting (0.1 s each) on its way to its first answer
    proc = subprocess.run([sys.executable, "-c", ONE_APP_SCRIPT], env=_env(tmp_path), cwd=ROOT,
                          capture_output=True, check=False, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
        "same_app": True, "key": "dareflow-temporary-server", "api": True}
