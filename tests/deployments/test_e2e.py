"""End to end: a real Prefect server, the deployments of deployments/deploy.py, a real process
worker, a triggered run that merges into a real S3-compatible store, the nightly schedule as
the server's scheduler materialised it, and nothing left running afterwards.

Servers and workers are started from Python (subprocess.Popen, each in its own process group:
a worker started with `&` from bash ignores SIGTERM) and stopped worker first, then server.
"""

import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from dareflow.deployments import deploy
from tests.flows.conftest import write_recipe
from tests.servers import free_port, process_group_alive

REPO_ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
SCHEDULED_NIGHTS = 4  # PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS below


class Proc:
    """A subprocess in its own process group, its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path):
        self.name, self.log = name, log_dir / f"{name}.log"
        with open(self.log, "wb") as log:
            self.popen = subprocess.Popen(
                argv, env=env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.pgid = self.popen.pid

    def tail(self, n: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the group, wait for the leader, SIGKILL whatever remains of the group."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, signal.SIGKILL)
            self.popen.wait(timeout=timeout)
        deadline = time.monotonic() + timeout
        while process_group_alive(self.pgid) and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, signal.SIGKILL)
            time.sleep(0.1)


def _wait_healthy(api_url: str, server: Proc, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.popen.poll() is not None:
            pytest.fail(f"prefect server exited ({server.popen.returncode}):\n{server.tail()}")
        with contextlib.suppress(OSError), urllib.request.urlopen(
                f"{api_url}/health", timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(0.3)
    pytest.fail(f"prefect server not healthy after {timeout:.0f} s:\n{server.tail()}")


def _processes_with_env(var: str, value: str) -> list[int]:
    """Pids of live processes whose environment has ``var=value`` (zombies excluded)."""
    needle = f"{var}={value}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def _next_nights(now: dt.datetime, n: int, tz: ZoneInfo) -> list[dt.datetime]:
    """The next ``n`` 02:00 wall-clock times in ``tz`` after ``now``."""
    day = now.astimezone(tz).date()
    nights = []
    while len(nights) < n:
        t = dt.datetime.combine(day, dt.time(2, 0), tzinfo=tz)
        if t > now:
            nights.append(t)
        day += dt.timedelta(days=1)
    return nights


@pytest.mark.slow  # 70-110 s on 2 busy cores: server ~25 s, deploy ~15 s, run ~30 s
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="process checks read /proc")
def test_nightly_deployment_runs_on_a_worker_into_s3(pico_family, s3_bucket, tmp_path):
    from prefect import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterState,
        FlowRunFilterStateName,
    )
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from dareflow.io import storage

    started = time.monotonic()
    home = tmp_path / "prefect-home"
    home.mkdir()
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PREFECT_") and k != "DAREFLOW_STORE"}
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1",
        "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "1",
        "PREFECT_SERVER_SERVICES_SCHEDULER_MIN_RUNS": str(SCHEDULED_NIGHTS),
        "PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS": str(SCHEDULED_NIGHTS),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "5",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    })
    recipe = write_recipe(tmp_path / "pico.yaml", {
        "name": "pico",
        "merge_method": "dare_linear",
        "base_model": str(pico_family["base"]),
        "models": [{"model": str(pico_family["a"]), "parameters": {"drop_rate": 0.3}},
                   {"model": str(pico_family["b"]), "parameters": {"drop_rate": 0.3}}],
        "dtype": "float32",
        "seed": 1,
    })
    procs: list[Proc] = []
    timings: dict[str, float] = {}
    try:
        server = Proc("server", [PREFECT, "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port), "--no-ui"], env, tmp_path)
        procs.append(server)
        _wait_healthy(api_url, server)
        timings["server"] = time.monotonic() - started

        # The worker starts while we deploy (it creates the pool if it gets there first).
        worker = Proc("worker", [PREFECT, "worker", "start", "--pool", deploy.WORK_POOL,
                                 "--type", "process"], env, tmp_path)
        procs.append(worker)
        # Deploy exactly as a user does; the store comes from the deploy command.
        deployed = subprocess.run(
            [sys.executable, "-m", "dareflow.deployments.deploy", "--env", "dev",
             "--store", s3_bucket.uri, "--recipe", str(recipe)],
            env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False,
        )
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        line = next(ln for ln in deployed.stdout.splitlines() if ln.startswith("deployed "))
        full_name = line.split()[1]
        assert full_name.endswith("/nightly-pico"), deployed.stdout
        timings["deploy"] = time.monotonic() - started

        with temporary_settings({PREFECT_API_URL: api_url}), \
                get_client(sync_client=True) as client:
            pool = client.read_work_pool(deploy.WORK_POOL)
            assert pool.type == "process"
            [deployment] = client.read_deployments(deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=["nightly-pico"])))
            assert deployment.work_pool_name == deploy.WORK_POOL
            assert deployment.parameters["store"] == s3_bucket.uri
            assert deployment.parameters["out"] == f"{s3_bucket.uri}/models/pico"
            assert deployment.job_variables == {"env": {"DAREFLOW_STORE": s3_bucket.uri}}
            assert deployment.pull_steps == [{
                "prefect.deployments.steps.set_working_directory":
                    {"directory": str(REPO_ROOT)}}]
            [schedule] = deployment.schedules
            assert (schedule.schedule.cron, schedule.schedule.timezone) == (
                "0 2 * * *", "Europe/Berlin")

            run = run_deployment(full_name, timeout=0)
            deadline = time.monotonic() + 240
            while True:
                run = client.read_flow_run(run.id)
                if run.state.is_final():
                    break
                if worker.popen.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"flow run {run.state.name}; worker log:\n{worker.tail()}")
                time.sleep(0.5)
            assert run.state.is_completed(), (
                f"{run.state.name}: {run.state.message}\n{worker.tail()}")
            timings["run"] = time.monotonic() - started

            # The schedule, as the server's scheduler materialised it.
            deadline = time.monotonic() + 30
            while True:
                scheduled = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(
                        deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id]),
                        state=FlowRunFilterState(name=FlowRunFilterStateName(any_=["Scheduled"])),
                    ),
                    sort="EXPECTED_START_TIME_ASC",
                )
                if len(scheduled) >= SCHEDULED_NIGHTS or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        berlin = ZoneInfo("Europe/Berlin")
        times = [r.expected_start_time for r in scheduled]
        assert times == _next_nights(dt.datetime.now(dt.timezone.utc), SCHEDULED_NIGHTS, berlin)
        assert all(t.astimezone(berlin).time() == dt.time(2, 0) for t in times)
        assert all(r.parameters["store"] == s3_bucket.uri for r in scheduled)

        # The artifacts, read back from the S3 server.
        model = f"{s3_bucket.uri}/models/pico"
        opts = s3_bucket.storage_options
        manifest = json.loads(storage.read_bytes(f"{model}/manifest.json", **opts))
        assert len(manifest["shards"]) == 4
        for shard, meta in manifest["shards"].items():
            assert storage.sha256_of(f"{model}/{shard}", **opts) == meta["sha256"], shard
        assert manifest["recipe"]["merge_method"] == "dare_linear"
        files = set(storage.listdir(model, **opts))
        assert {"config.json", "model.safetensors.index.json", "README.md"} <= {
            f.rsplit("/", 1)[-1] for f in files}
    finally:
        for proc in reversed(procs):  # worker before server
            proc.stop()
    for proc in procs:
        assert not process_group_alive(proc.pgid), f"{proc.name} group {proc.pgid} still alive"
    assert _processes_with_env("PREFECT_HOME", str(home)) == []
    timings["total"] = time.monotonic() - started
    print("e2e timings (s since start): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
