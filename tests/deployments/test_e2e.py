"""End to end, as a team runs nightly merges: a real Prefect server, the deployments of
deployments/deploy.py with their code cloned from a git repository (a bare repository made
from this working tree in a temp folder, never the checkout's path), two workers on two work
pools (merge; evaluation with --limit 1), the demo family and the history in a real
S3-compatible store, three nights triggered with `prefect deployment run`: merge + evaluate +
history; nothing changed, nothing recomputed; a worse recipe flagged as a regression. Then the
nightly schedule as the server's scheduler materialised it, and nothing left running.

Servers and workers are started from Python (subprocess.Popen, each in its own process group:
a worker started with `&` from bash ignores SIGTERM) and stopped worker first, then server.
"""

import contextlib
import datetime as dt
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml

from dareflow.deployments import deploy
from tests.servers import free_port, process_group_alive

REPO_ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
SCHEDULED_NIGHTS = 4  # PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS below


class Proc:
    """A subprocess in its own process group, its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path,
                 cwd: Path = REPO_ROOT):
        self.name, self.log = name, log_dir / f"{name}.log"
        with open(self.log, "wb") as log:
            self.popen = subprocess.Popen(
                argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
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


def _bare_repository(tmp_path: Path) -> str:
    """A bare git repository holding this working tree's files (tracked, and untracked but
    not ignored: what the next commit would hold), on branch main; its file:// URL."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"],
                            cwd=REPO_ROOT, capture_output=True, check=True).stdout
    work = tmp_path / "code"
    for name in filter(None, listed.decode().split("\0")):
        src = REPO_ROOT / name
        if src.is_file():  # deleted but still tracked: not in the next commit
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, work / name, follow_symlinks=False)
    git = ["git", "-c", "user.name=dareflow-test", "-c", "user.email=test@dareflow.invalid"]
    for argv in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "tree"]):
        subprocess.run(git + argv, cwd=work, check=True, capture_output=True)
    bare = tmp_path / "dareflow.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True,
                   capture_output=True)
    shutil.rmtree(work)
    return bare.as_uri()


def _family_in_store(tmp_path: Path, bucket) -> dict[str, str]:
    """The demo family, built here and uploaded to the bucket; ``{member: s3 URI}``."""
    from dareflow.demo.family import build_demo_family
    from dareflow.io import storage

    root = tmp_path / "family"
    members = build_demo_family(root, threads=2)
    fs, _ = storage.get_fs(bucket.uri, **bucket.storage_options)
    uris = {}
    for name, folder in members.items():
        uri = f"{bucket.uri}/family/{name}"
        fs.put(f"{folder}/", f"{uri}/", recursive=True)
        uris[name] = uri
    return uris


def _demo_recipe(path: Path, family: dict[str, str], drop_rate: float | None = None) -> Path:
    """The demo recipe (``dareflow-demo-dare``) on the family in the store."""
    from dareflow.flows.demo import demo_recipes

    recipe = demo_recipes(Path("/family-root"), drop_rate)["dare"]
    recipe["base_model"] = family["base"]
    for model in recipe["models"]:
        model["model"] = family[Path(model["model"]).name]
    path.write_text(yaml.safe_dump(recipe))
    return path


def _trigger(name: str, env: dict[str, str]) -> str:
    """``prefect deployment run NAME`` as a user types it; the flow run's id."""
    done = subprocess.run([PREFECT, "deployment", "run", name], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return re.search(r"UUID: ([0-9a-f-]{36})", done.stdout).group(1)


def _wait_final(client, run_id: str, workers: list[Proc], timeout: float = 420.0):
    deadline = time.monotonic() + timeout
    while True:
        run = client.read_flow_run(run_id)
        if run.state and run.state.is_final():
            return run
        for worker in workers:
            if worker.popen.poll() is not None:
                pytest.fail(f"{worker.name} exited; its log:\n{worker.tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"flow run {run.state.name if run.state else '?'} after {timeout:.0f} s;"
                        + "".join(f"\n{w.name} log:\n{w.tail()}" for w in workers))
        time.sleep(1.0)


@pytest.mark.slow  # ~6 min on 2 cores: demo family ~2 min, server ~25 s, three nights ~2.5 min
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="process checks read /proc")
def test_three_nights_on_two_pools_from_a_git_repository(s3_bucket, tmp_path):
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterState,
        FlowRunFilterStateName,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from dareflow import history
    from dareflow.io import storage

    started = time.monotonic()
    timings: dict[str, float] = {}
    family = _family_in_store(tmp_path, s3_bucket)
    repo = _bare_repository(tmp_path)
    timings["family+repo"] = time.monotonic() - started
    home = tmp_path / "prefect-home"
    home.mkdir()
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "DAREFLOW_"))}
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
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "DAREFLOW_CACHE": str(tmp_path / "cache"),
    })
    store = f"{s3_bucket.uri}/store"
    recipe = _demo_recipe(tmp_path / "demo.yaml", family)
    worse = _demo_recipe(tmp_path / "worse.yaml", family, drop_rate=0.99)
    deploy_argv = [sys.executable, "-m", "deployments.deploy", "--env", "dev", "--store", store,
                   "--suite", "demo_skills", "--limit", "20", "--device", "cpu",
                   "--repo", repo, "--branch", "main", "--recipe"]
    nightly = "dare-nightly/nightly-dareflow-demo-dare"
    procs: list[Proc] = []
    try:
        server = Proc("server", [PREFECT, "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port), "--no-ui"], env, tmp_path)
        procs.append(server)
        _wait_healthy(api_url, server)
        timings["server"] = time.monotonic() - started

        # Workers run elsewhere: their working folders are temp folders, not the checkout.
        workers = []
        for pool, extra in ((deploy.MERGE_POOL, []), (deploy.EVAL_POOL, ["--limit", "1"])):
            workdir = tmp_path / f"worker-{pool}"
            workdir.mkdir()
            workers.append(Proc(pool, [PREFECT, "worker", "start", "--pool", pool, "--type",
                                       "process", *extra], env, tmp_path, cwd=workdir))
        procs.extend(workers)
        deployed = subprocess.run(deploy_argv + [str(recipe)], env=env, cwd=REPO_ROOT,
                                  capture_output=True, text=True, timeout=180, check=False)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        assert deployed.stdout.splitlines()[:2] == [
            f"deployed {deploy.EVALUATION}", f"deployed {nightly}"], deployed.stdout
        timings["deploy"] = time.monotonic() - started

        with temporary_settings({PREFECT_API_URL: api_url}), \
                get_client(sync_client=True) as client:
            deployments = {d.name: d for d in client.read_deployments(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(
                    any_=["nightly-dareflow-demo-dare", "evaluation"])))}
            night, evaluation = deployments["nightly-dareflow-demo-dare"], deployments["evaluation"]
            pull = [{"prefect.deployments.steps.git_clone": {"repository": repo,
                                                             "branch": "main"}}]
            assert (night.pull_steps, evaluation.pull_steps) == (pull, pull)
            assert (night.entrypoint, evaluation.entrypoint) == (
                deploy.NIGHTLY_ENTRYPOINT, deploy.EVALUATE_ENTRYPOINT)
            assert (night.work_pool_name, evaluation.work_pool_name) == (
                deploy.MERGE_POOL, deploy.EVAL_POOL)
            assert {k: night.parameters[k] for k in ("store", "suite", "limit", "evaluation")} == {
                "store": store, "suite": "demo_skills", "limit": 20,
                "evaluation": deploy.EVALUATION}
            assert night.parameters["recipe"]["models"][0]["model"] == family["arithmetic"]
            assert night.job_variables == {"env": {"DAREFLOW_STORE": store}}
            [schedule] = night.schedules
            assert (schedule.schedule.cron, schedule.schedule.timezone) == (
                "0 2 * * *", "Europe/Berlin")
            assert not evaluation.schedules

            def night_run(label: str):
                run = _wait_final(client, _trigger(nightly, env), workers)
                timings[label] = time.monotonic() - started
                return run

            # Night 1: merge on the merge pool, evaluation handed to the evaluation pool.
            one = night_run("night 1")
            assert one.state.is_completed(), f"{one.state.message}\n{workers[0].tail()}"
            evals = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=[evaluation.id])))
            assert [(r.state.name, r.work_pool_name) for r in evals] == [
                ("Completed", deploy.EVAL_POOL)]
            uri = history.history_uri(store, "dareflow-demo-dare")
            table = history.read_history(uri)
            assert len(table) == 8 and set(table["flow_run_id"]) == {str(one.id)}
            assert sorted(set(zip(table["role"], table["model"]))) == [
                ("base", "base"), ("merged", "merged"), ("source", "arithmetic"),
                ("source", "reverse")]
            merged = table[table["role"] == "merged"].set_index("task")["value"]
            assert (merged > 0.5).all(), merged  # the DARE merge at p = 0.7 keeps both skills

            # Night 2: nothing changed, nothing recomputed, still recorded.
            two = night_run("night 2")
            assert two.state.is_completed(), two.state.message
            assert two.state.message.startswith("Nothing changed, nothing recomputed. merge: 0 "
                                                "unit(s) merged, 5 reused"), two.state.message
            assert "8 from the results cache" in two.state.message
            table = history.read_history(uri)
            assert len(table) == 16 and table["verdict"].tolist() == ["ok"] * 16
            first, second = (g.reset_index(drop=True)
                             for _, g in table.groupby("flow_run_id", sort=False))
            assert first["value"].tolist() == second["value"].tolist()

            # Night 3: the recipe made worse on purpose (p = 0.99), redeployed: flagged.
            deployed = subprocess.run(deploy_argv + [str(worse)], env=env, cwd=REPO_ROOT,
                                      capture_output=True, text=True, timeout=180, check=False)
            assert deployed.returncode == 0, deployed.stdout + deployed.stderr
            three = night_run("night 3")
            assert three.state.is_failed(), three.state.message
            assert three.state.message.startswith("regression on "), three.state.message
            table = history.read_history(uri)
            tonight = table[table["flow_run_id"] == str(three.id)]
            assert len(tonight) == 8 and set(tonight["verdict"]) == {"regression"}
            [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["dareflow-nightly-dareflow-demo-dare"])),
                limit=1, sort="CREATED_DESC")
            assert artifact.flow_run_id == three.id
            assert "**REGRESSION** vs " in artifact.data
            assert history.plot_uri(store, "dareflow-demo-dare") in artifact.data
            opts = s3_bucket.storage_options
            assert storage.read_bytes(history.plot_uri(store, "dareflow-demo-dare"),
                                      **opts)[:4] == b"\x89PNG"

            # Nothing secret in deployments, artifacts or the history.
            secrets = [os.environ[k] for k in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID")]
            dump = (table.to_csv() + artifact.data
                    + "".join(d.model_dump_json() for d in deployments.values()))
            assert not [s for s in secrets if s in dump]

            # The schedule, as the server's scheduler materialised it.
            deadline = time.monotonic() + 30
            while True:
                scheduled = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(
                        deployment_id=FlowRunFilterDeploymentId(any_=[night.id]),
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
        assert all(r.parameters["store"] == store for r in scheduled)
    finally:
        for proc in reversed(procs):  # workers before server
            proc.stop()
    for proc in procs:
        assert not process_group_alive(proc.pgid), f"{proc.name} group {proc.pgid} still alive"
    assert _processes_with_env("PREFECT_HOME", str(home)) == []
    timings["total"] = time.monotonic() - started
    print("e2e timings (s since start): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
