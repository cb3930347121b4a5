"""dareflow vs mergekit on a synthetic Llama family, in the same run.

    python -m benchmarks.merge_vs_mergekit                      # all four merges, 1 repeat
    python -m benchmarks.merge_vs_mergekit --repeats 2 --merges dare_ties ties
    python -m benchmarks.merge_vs_mergekit --deeper --skip-mergekit   # 32 layers: memory
    python -m benchmarks.merge_vs_mergekit --device cuda        # math on the GPU
    python -m benchmarks.merge_vs_mergekit --tiny --merges ties --repeats 5   # start-up
    python -m benchmarks.merge_vs_mergekit --size 7b --merges dare_ties --no-checks
        # Mistral-7B shapes, cold page cache: ~73 GB of disk (~87 GB with the checks)

What it does (everything cached or written under ``.bench/`` in the repository):

1. Generates once the family: Llama, hidden 2048, intermediate 5632, 16 layers
   (``--deeper``: 32), 32 heads, 4 KV heads, vocab 32000, bf16; a random base and two
   fine-tunes = base + N(0, 0.002) (``benchmarks/family.py``). ``--tiny``: 4 layers,
   hidden 64 (start-up and Prefect's overhead only).
2. Installs mergekit once into ``.bench/mergekit-venv`` (the CPU torch wheel first;
   mergekit is a baseline here, never a dependency of dareflow).
3. Per merge (dare_ties, dare_linear at density 0.5, task_arithmetic, ties at density
   0.5; weight 0.5 each) and repeat: the IO floor (read the three inputs, write one
   output of the merged size with fsync), then dareflow (``dareflow merge``, fresh
   store, so nothing is cached) in both modes (``--modes``: ``plain``, the command as a
   user runs it without a Prefect server, which starts a temporary one; ``server``, the
   command with ``PREFECT_API_URL`` naming a Prefect server the script started
   beforehand) and mergekit (``mergekit-yaml``, CPU, default shard size), rotating
   which goes first. Before each run, the previous outputs are
   deleted and the machine settles for ``--settle`` seconds (see "Measuring" below);
   then the inputs are read into the page cache (``--cache warm``, the default) or
   evicted from it (``--cache cold``, the default for ``--size 7b``, whose three models
   do not fit in memory). A ``--size 7b`` family is deleted after the run.
4. Compares outputs: task_arithmetic and ties within bf16 rounding of mergekit's (the
   dareflow recipes use the variant options that match mergekit); DARE merges by the
   fraction of changed entries and E[δ̂] (slope on Σ w δ) within 5σ of mergekit's.
5. Checks dareflow's bytes: identical across ``--max-workers`` 1 and 2 and torch
   threads 1 and 2 (mergekit's DARE output changes between runs: unseeded RNG).
6. Prints the table (medians over repeats).

Measuring: wall time; CPU time (rusage of the command and its waited-for children: not
the plain command's temporary server, which it does not wait for); peak RSS and peak
anonymous memory (RssAnon) of the process tree (the plain command's temporary server
included), sampled every 50 ms. The plain mode's Prefect home
(``.bench/prefect-home-plain``) is created before the first timed run (a user's
database exists; its one-off creation is not timed). On the
benchmark VM, writing into memory the guest recently returned to the host costs
~2 s/GB of page faults: the settle pause makes every run (both tools and the IO floor)
start from the same state.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from benchmarks.family import FamilySpec, generate_family
from benchmarks.measure import RunStats, drop_from_cache, io_floor, run_measured, warm_inputs
from benchmarks.report import (
    MERGES,
    MODES_LEGEND,
    WEIGHT,
    Agreement,
    DareStats,
    dare_agrees,
    dareflow_phases,
    dareflow_recipe,
    format_table,
    median,
    mergekit_config,
)

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / ".bench"
MERGEKIT_VENV = BENCH / "mergekit-venv"
TORCH_PIN = "torch==2.13.0"
TINY = FamilySpec(hidden=64, intermediate=160, layers=4, heads=4, kv_heads=2, vocab=256)
#: dareflow's two modes: the plain command (it starts a temporary Prefect server) and the
#: command against a Prefect server started beforehand (``PREFECT_API_URL``).
MODES = {"plain": "dareflow", "server": "dareflow_server"}
#: Family sizes (``--size``): the benchmark family, its 2x deeper variant (``--deeper``)
#: and a Mistral-7B-shaped one (Llama tensors with Mistral 7B's shapes: hidden 4096,
#: intermediate 14336, 32 layers, 32/8 heads; ~14.5 GB per model, written streamed).
SIZES = {"0.84b": FamilySpec(), "1.5b": FamilySpec(layers=32),
         "7b": FamilySpec(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8)}
#: Families at least this large are written tensor by tensor (they do not fit in memory).
STREAMED_PARAMS = 3_000_000_000


def log(*args: object) -> None:
    print(*args, flush=True)


# ----------------------------------------------------------------------------- setup


def ensure_mergekit() -> Path:
    """``mergekit-yaml`` of the benchmark venv, installing it on first use."""
    exe = MERGEKIT_VENV / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    log(f"installing mergekit into {MERGEKIT_VENV} (once)")
    subprocess.run([sys.executable, "-m", "venv", str(MERGEKIT_VENV)], check=True)
    pip = [str(MERGEKIT_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [TORCH_PIN], check=True)  # first, or mergekit pulls CUDA torch
    subprocess.run(pip + ["mergekit"], check=True)
    return exe


def mergekit_version() -> str:
    out = subprocess.run([str(MERGEKIT_VENV / "bin" / "python"), "-c",
                          "import importlib.metadata as m; print(m.version('mergekit'))"],
                         capture_output=True, text=True, check=False)
    return out.stdout.strip() or "?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrefectServer:
    """A Prefect server on 127.0.0.1 for the dareflow runs (own process group)."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> PrefectServer:  # noqa: PYI034
        env = dict(os.environ, PREFECT_HOME=str(self.home),
                   PREFECT_SERVER_ANALYTICS_ENABLED="false")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
             "--port", str(self.port)], env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return self
            except OSError:
                time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"Prefect server did not answer on {self.url} within 120 s")

    def __exit__(self, *exc: object) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def dareflow_exe() -> list[str]:
    exe = Path(sys.executable).parent / "dareflow"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dareflow.cli"]


# ----------------------------------------------------------------------------- runs


def check_disk_space(spec: FamilySpec, outputs: int) -> None:
    """Refuse to start without room for the family (if not yet written) and ``outputs``
    model-sized outputs at once (dareflow's store and output; mergekit's output, kept
    for the comparison unless ``--no-checks``).

    Raises:
        SystemExit: with the space needed and the space free.
    """
    model = 2 * spec.num_params()  # bf16
    written = (BENCH / "families" / spec.name / "family.json").exists()
    needed = model * (outputs + (0 if written else 3))
    BENCH.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(BENCH).free
    if free < needed * 1.03:
        what = f"{outputs} outputs" if written else f"3 models + {outputs} outputs"
        raise SystemExit(
            f"error: the {spec.num_params() / 1e9:.2f} B family needs ~{needed / 1e9:.0f} GB "
            f"under {BENCH} ({what} of {model / 1e9:.1f} GB); {free / 1e9:.0f} GB are free. "
            "Free space, skip the comparison with --no-checks (one output fewer), or run a "
            "smaller --size")


def _clean(*paths: Path) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def settle(seconds: float) -> None:
    os.sync()
    time.sleep(seconds)


def run_dareflow(recipe: Path, out: Path, store: Path, env: dict, log_path: Path,
                 max_workers: int | None = None) -> RunStats:
    cmd = dareflow_exe() + ["merge", str(recipe), "--out", str(out), "--store", str(store)]
    if max_workers:
        cmd += ["--max-workers", str(max_workers)]
    started = time.time()
    stats = run_measured(cmd, env=env, cwd=str(REPO), log_path=str(log_path))
    if stats.returncode != 0:
        raise RuntimeError(f"dareflow failed ({stats.returncode}); see {log_path}")
    stats.phases = dareflow_phases(log_path.read_text(errors="replace").splitlines(),
                                   started, stats.wall_s)
    return stats


def run_mergekit(config: Path, out: Path, log_path: Path) -> RunStats:
    cmd = [str(MERGEKIT_VENV / "bin" / "mergekit-yaml"), str(config), str(out),
           "--no-cuda", "--lazy-unpickle", "--quiet"]
    stats = run_measured(cmd, env=dict(os.environ), cwd=str(BENCH), log_path=str(log_path))
    if stats.returncode != 0:
        raise RuntimeError(f"mergekit failed ({stats.returncode}); see {log_path}")
    return stats


def output_digest(folder: Path) -> str:
    """sha256 over the folder's safetensors files (names and bytes, sorted)."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(8 << 20), b""):
                h.update(block)
    return h.hexdigest()


def dareflow_digest(folder: Path) -> str:
    """sha256 of the shard checksums in dareflow's manifest (what the output is)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    return hashlib.sha256(json.dumps(manifest["shards"], sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- compare


def _tensor_files(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    from safetensors import safe_open

    single = folder / "model.safetensors"
    with safe_open(str(single), "pt") as f:
        return {name: single for name in f.keys()}  # noqa: SIM118 (a safetensors handle)


def compare_outputs(method: str, family: dict[str, Path], dareflow_out: Path,
                    mergekit_out: Path, sample: int = 1 << 20) -> tuple[bool, str]:
    """dareflow's merge against mergekit's, on the first ``sample`` entries of every
    tensor (see ``MERGES``: the recipes compute the same method variant)."""
    from safetensors import safe_open

    models = {role: path / "model.safetensors" for role, path in family.items()}
    df_files, mk_files = _tensor_files(dareflow_out), _tensor_files(mergekit_out)
    handles: dict[Path, object] = {}

    def get(path: Path, name: str):
        if path not in handles:
            handles[path] = safe_open(str(path), "pt")
        return handles[path].get_slice(name)

    def head(path: Path, name: str):
        s = get(path, name)
        rows = max(1, sample // max(1, int(torch_prod(s.get_shape()[1:]))))
        return s[:rows].reshape(-1)[:sample]

    agreement, df_stats, mk_stats = Agreement(), DareStats(), DareStats()
    both_kept_base = 0  # entries both merges leave at the base value (mask overlap)
    for name in sorted(df_files):
        base = head(models["base"], name)
        fts = [head(models[r], name) for r in sorted(models) if r != "base"]
        a, b = head(df_files[name], name), head(mk_files[name], name)
        if MERGES[method]["density"] is not None and method != "ties":
            df_stats.add(base, a, fts, [WEIGHT] * len(fts))
            mk_stats.add(base, b, fts, [WEIGHT] * len(fts))
            both_kept_base += int(((a == base) & (b == base)).sum())
        else:
            agreement.add(a, b, [base, *fts])
    if agreement.elements:
        # ties: mergekit ranks bf16-rounded deltas for its top-k trim, so entries at the
        # trim boundary (~1 %) can be selected differently
        ok = agreement.fraction >= (0.999 if method == "task_arithmetic" else 0.98)
        return ok, (f"{agreement.fraction:.5%} of {agreement.elements} sampled entries "
                    f"within bf16 rounding (2 ulp of the operands) of mergekit's (max "
                    f"{agreement.max_ulps:.0f} ulp)")
    ok, text = dare_agrees(df_stats, mk_stats)
    independent = (1 - df_stats.changed_fraction) * (1 - mk_stats.changed_fraction)
    return ok, (f"{text}; unchanged in both {both_kept_base / df_stats.n:.5f} "
                f"(independent masks: {independent:.5f})")


def torch_prod(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# ----------------------------------------------------------------------------- cuda


def cuda_section(family: dict[str, Path], merges: list[str]) -> None:
    """Merge throughput with the math on CUDA vs the GPU's memory bandwidth.

    Tensors are read on the CPU, copied to the GPU, merged there with the same
    ``merge_tensor`` (DARE masks drawn on the GPU from the same Philox-4x32 counters
    as on the CPU), and one tensor per merge is compared byte for byte with the CPU
    result (the ``l1`` rescale's float64 sums run in another order on the GPU, so a
    last-bit difference of the factor is possible there).
    """
    import torch

    if not torch.cuda.is_available():
        log("\n--device cuda: no CUDA device here; the CUDA section is skipped.")
        return
    device = torch.device("cuda")
    log(f"\nCUDA: {torch.cuda.get_device_properties(device).name}")
    device_section(family, merges, device)


def device_section(family: dict[str, Path], merges: list[str], device) -> dict[str, float]:
    """Per merge: bytes touched / seconds of ``merge_tensor`` on ``device``, against the
    device's measured copy bandwidth (the roofline). Returns GB/s per merge."""
    import torch
    from safetensors import safe_open

    from dareflow.merge.plan import build_spec
    from dareflow.methods import merge_tensor
    from dareflow.recipe import parse_recipe

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # measured copy bandwidth (read + write) as the roofline
    x = torch.empty(1 << 26, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync()
    t = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    sync()
    bandwidth = 5 * 2 * x.numel() * 4 / (time.perf_counter() - t)
    del x, y
    log(f"{device.type}: measured copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    files = {r: safe_open(str(p / "model.safetensors"), "pt") for r, p in family.items()}
    names = list(files["base"].keys())
    rates = {}
    for method in merges:
        recipe = parse_recipe(dareflow_recipe(method, str(family["base"]),
                                              [str(family[r]) for r in sorted(family)
                                               if r != "base"]))
        spec = build_spec(recipe, "bfloat16")
        seconds = 0.0
        moved = 0
        for i, name in enumerate(names):
            base = files["base"].get_tensor(name).to(device)
            fts = [files[r].get_tensor(name).to(device) for r in sorted(files) if r != "base"]
            sync()
            t = time.perf_counter()
            out = merge_tensor(name, base, fts, spec)
            sync()
            seconds += time.perf_counter() - t
            moved += base.nbytes * (1 + len(fts)) + out.nbytes
            if i == 0:
                cpu = merge_tensor(name, base.cpu(), [f.cpu() for f in fts], spec)
                same = torch.equal(cpu.view(torch.int16), out.cpu().view(torch.int16))
                log(f"  {method}: {name} identical to the CPU result: {same}")
        rates[method] = moved / seconds / 1e9
        log(f"  {method}: {moved / 1e9:.2f} GB touched in {seconds:.2f} s = "
            f"{rates[method]:.1f} GB/s ({moved / seconds / bandwidth:.1%} of copy "
            f"bandwidth; DARE masks drawn on the {device.type})")
    return rates


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.merge_vs_mergekit",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=1, help="runs per tool and merge (median)")
    p.add_argument("--merges", nargs="+", default=list(MERGES), choices=list(MERGES))
    p.add_argument("--skip-mergekit", action="store_true", help="dareflow and IO floor only")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES),
                   help="dareflow's modes: plain (the command alone: it starts a temporary "
                        "Prefect server) and server (against a running Prefect server)")
    p.add_argument("--deeper", action="store_true",
                   help="the 2x deeper family (32 layers): memory must not grow "
                        "(= --size 1.5b)")
    p.add_argument("--size", choices=list(SIZES), default="0.84b",
                   help="the family: 0.84b (default), 1.5b (--deeper), 7b (Mistral-7B "
                        "shapes, ~14.5 GB per model: larger than the page cache here; the "
                        "script checks the free disk space first and deletes the store "
                        "after each dareflow run)")
    p.add_argument("--tiny", action="store_true",
                   help="a 4-layer toy family (hidden 64): start-up and Prefect overhead; "
                        "checks the script end to end in a few minutes")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: also merge with the math on the GPU and report throughput")
    p.add_argument("--settle", type=float, default=10.0,
                   help="seconds of rest before every measured run")
    p.add_argument("--no-gate", action="store_true",
                   help="turn dareflow's DARE applicability gate off (it samples every "
                        "tensor before merging; mergekit has none): the merge alone")
    p.add_argument("--no-checks", action="store_true",
                   help="skip the output comparison and the determinism runs (each run's "
                        "output is deleted before the next: one model-sized output fewer "
                        "on disk)")
    p.add_argument("--cache", choices=["warm", "cold"], default=None,
                   help="the inputs before every measured run: warm (read once, in the "
                        "page cache) or cold (evicted from it: read from the disk); "
                        "default warm, cold for --size 7b (its family is larger than the "
                        "page cache)")
    p.add_argument("--keep-family", action="store_true",
                   help="keep a --size 7b family (~44 GB) after the run; deleted by default")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = TINY if args.tiny else SIZES["1.5b" if args.deeper else args.size]
    streamed = spec.num_params() >= STREAMED_PARAMS
    check_disk_space(spec, outputs=2 if args.no_checks or args.skip_mergekit else 3)
    cache = args.cache or ("cold" if streamed else "warm")
    family = generate_family(BENCH / "families", spec, log=log, streamed=streamed)
    try:
        return measure(args, spec, family, cache)
    finally:
        if streamed and not args.keep_family:
            shutil.rmtree(family["base"].parent)
            log(f"deleted the family ({spec.name}); --keep-family keeps it")


def prepare_inputs(inputs: list[str], cache: str) -> None:
    """Before a measured run: the inputs in the page cache (warm) or out of it (cold)."""
    if cache == "warm":
        warm_inputs(inputs)
    else:
        drop_from_cache(inputs)


def measure(args: argparse.Namespace, spec: FamilySpec, family: dict[str, Path],
            cache: str) -> int:
    """The runs, the checks and the table (see the module's docstring)."""
    inputs = [str(p / "model.safetensors") for p in family.values()]
    out_bytes = os.path.getsize(inputs[0])
    fine_tunes = [str(family[r]) for r in sorted(family) if r != "base"]
    runs = BENCH / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    log(f"family: {spec.num_params() / 1e9:.2f} B params, {spec.layers} layers, "
        f"{out_bytes / 2**30:.2f} GiB per model; {cache} page cache before each run; "
        f"load {os.getloadavg()[0]:.1f}")
    if args.device == "cuda":
        cuda_section(family, args.merges)
    with_mergekit = not args.skip_mergekit
    if with_mergekit:
        ensure_mergekit()
        log(f"mergekit {mergekit_version()} in {MERGEKIT_VENV}")

    # untimed: compile dareflow's kernels if this checkout has not yet (numba caches the
    # machine code on disk; every later process only loads it)
    warm_up = "from dareflow.methods.kernels import warm_up; warm_up()"
    subprocess.run([sys.executable, "-c", warm_up], cwd=str(REPO), check=True)
    results: dict[str, dict[str, list[RunStats]]] = {}
    checks: list[tuple[str, bool, str]] = []
    digests: dict[str, list[str]] = {}
    plain_env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    plain_env.update(PREFECT_HOME=str(BENCH / "prefect-home-plain"),
                     PREFECT_LOGGING_LEVEL="INFO")
    if "plain" in args.modes:  # untimed: the plain mode's database, as a user has one
        create_db = ("from dareflow.flows import runtime; "
                     "runtime.start_temporary_server(); runtime.api_ready()")
        subprocess.run([sys.executable, "-c", create_db],
                       env=plain_env, cwd=str(REPO), check=True)
    with PrefectServer(BENCH / "prefect-home") as server:
        env = dict(os.environ, PREFECT_HOME=str(BENCH / "prefect-home"),
                   PREFECT_API_URL=server.url, PREFECT_LOGGING_LEVEL="INFO")
        envs = {"dareflow": plain_env, "dareflow_server": env}
        tools = [MODES[m] for m in MODES if m in args.modes] + (
            ["mergekit"] if with_mergekit else [])
        for method in args.merges:
            recipe_path = runs / f"{method}.dareflow.yaml"
            recipe = dareflow_recipe(method, str(family["base"]), fine_tunes)
            if args.no_gate:
                recipe["gate"] = {"mode": "off"}
            recipe_path.write_text(yaml.safe_dump(recipe))
            config_path = runs / f"{method}.mergekit.yaml"
            config_path.write_text(yaml.safe_dump(mergekit_config(method, str(family["base"]),
                                                                  fine_tunes)))
            df_out, mk_out = runs / f"{method}-dareflow", runs / f"{method}-mergekit"
            store = runs / "store"
            per = results.setdefault(method, {"dareflow": [], "dareflow_server": [],
                                              "mergekit": [], "floor": [], "direct_floor": []})
            for rep in range(args.repeats):
                _clean(df_out, mk_out, store)
                for kind, direct in (("floor", False), ("direct_floor", True)):
                    settle(args.settle)
                    prepare_inputs(inputs, cache)
                    per[kind].append(io_floor(inputs, str(runs / "io-floor.tmp"), out_bytes,
                                              direct=direct))
                order = tools[rep % len(tools):] + tools[:rep % len(tools)]
                for tool in order:
                    target = mk_out if tool == "mergekit" else df_out
                    # without the comparison, no output is kept: room for the next one
                    _clean(*((df_out, mk_out) if args.no_checks else (target,)), store)
                    settle(args.settle)
                    prepare_inputs(inputs, cache)
                    if tool != "mergekit":
                        stats = run_dareflow(recipe_path, df_out, store, envs[tool],
                                             runs / f"{method}-{tool}.log")
                        digests.setdefault(method, []).append(dareflow_digest(df_out))
                        _clean(store)  # its shards were copied out: room for the next
                    else:
                        stats = run_mergekit(config_path, mk_out, runs / f"{method}-mergekit.log")
                        digests.setdefault(method + "/mergekit", []).append(output_digest(mk_out))
                    per[tool].append(stats)
                    log(f"{method:16s} {tool:15s} rep {rep + 1}: {stats.wall_s:6.1f} s wall, "
                        f"{stats.cpu_s:6.1f} s CPU, peak RSS {stats.peak_rss_mb:5.0f} MiB, "
                        f"anon {stats.peak_anon_mb:5.0f} MiB")
                    if getattr(stats, "phases", None):
                        log("    dareflow phases: " + ", ".join(
                            f"{k} {v:.1f} s" for k, v in stats.phases.items()))
                log(f"{method:16s} IO floor  rep {rep + 1}: {per['floor'][-1].wall_s:6.1f} s "
                    f"wall, {per['floor'][-1].cpu_s:.1f} s CPU; with O_DIRECT writes "
                    f"{per['direct_floor'][-1].wall_s:.1f} s wall")
            if not args.no_checks and with_mergekit:
                ok, text = compare_outputs(method, family, df_out, mk_out)
                checks.append((f"{method}: dareflow vs mergekit", ok, text))
                log(f"  compare: {'ok' if ok else 'FAILED'}: {text}")
            if not args.no_checks and method == args.merges[0]:
                reference = dareflow_digest(df_out)
                for workers, threads in ((1, 1), (2, 1), (1, 2)):
                    _clean(df_out, store)
                    run_dareflow(recipe_path, df_out, store,
                                 dict(env, OMP_NUM_THREADS=str(threads)),
                                 runs / f"{method}-dareflow-w{workers}t{threads}.log",
                                 max_workers=workers)
                    same = dareflow_digest(df_out) == reference
                    label = f"{method}: dareflow bytes, {workers} worker(s) / {threads} thread(s)"
                    checks.append((label, same, "identical to 2 workers / default threads"
                                   if same else "DIFFERENT bytes"))
                    log(f"  {label}: {'identical' if same else 'DIFFERENT'}")
            _clean(df_out, mk_out, store)

    rows = []
    for method, per in results.items():
        row = {"merge": method, "io_floor_wall": median([s.wall_s for s in per["floor"]]),
               "direct_floor_wall": median([s.wall_s for s in per["direct_floor"]])}
        for tool in ("dareflow_server", "dareflow", "mergekit"):
            stats = per[tool]
            if stats:
                row[f"{tool}_wall"] = median([s.wall_s for s in stats])
                # CPU and memory columns: the plain command's (the server mode's without it)
                key = "dareflow" if tool == "dareflow_server" else tool
                row[f"{key}_cpu"] = median([s.cpu_s for s in stats])
                row[f"{key}_rss"] = max(s.peak_rss_mb for s in stats)
                row[f"{key}_anon"] = max(s.peak_anon_mb for s in stats)
        rows.append(row)
    log(f"\n{spec.num_params() / 1e9:.2f} B params, {spec.layers} layers, bf16; "
        f"{args.repeats} repeat(s), medians (memory: max); {os.cpu_count()} cores; "
        f"load average now {os.getloadavg()[0]:.1f}\n")
    log(format_table(rows))
    log("\n" + MODES_LEGEND)
    for method, per in results.items():
        for tool in ("dareflow", "dareflow_server"):
            if per[tool]:
                log(f"{method} {tool}: walls " + ", ".join(f"{s.wall_s:.2f}" for s in per[tool])
                    + "; peak anon MiB " + ", ".join(f"{s.peak_anon_mb:.0f}" for s in per[tool]))
    for method in args.merges:
        mk = digests.get(method + "/mergekit", [])
        if len(mk) > 1:
            log(f"mergekit {method}: outputs of {len(mk)} runs "
                f"{'identical' if len(set(mk)) == 1 else 'differ'}")
        df = digests.get(method, [])
        if len(df) > 1:
            log(f"dareflow {method}: outputs of {len(df)} runs "
                f"{'identical' if len(set(df)) == 1 else 'DIFFER'}")
    for label, ok, text in checks:
        log(f"{'ok  ' if ok else 'FAIL'} {label}: {text}")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
