"""Real ``python -m dareflow.cli merge`` processes for the output tests, and what a
complete published model looks like.

The processes use this test process's temporary Prefect server (``PREFECT_API_URL``)
instead of starting one each (~20 s each on 2 cores), and run in their own process group,
killed as a group afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def prefect_api_url() -> str:
    """The API of this process's temporary Prefect server (started if needed)."""
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    return server.api_url


def start_merge(recipe: Path, out: Path, store: Path, log: Path, *, overwrite: bool = False,
                env: dict[str, str] | None = None) -> tuple[subprocess.Popen, object]:
    """Start ``dareflow merge`` (one worker); its stdout and stderr go to ``log``."""
    argv = [sys.executable, "-m", "dareflow.cli", "merge", str(recipe), "--out", str(out),
            "--store", str(store), "--max-workers", "1"] + (["--overwrite"] if overwrite else [])
    sink = open(log, "wb")  # noqa: SIM115 - closed by finish()
    proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT,
                            start_new_session=True,
                            env={**os.environ, "PREFECT_API_URL": prefect_api_url(),
                                 **(env or {})})
    return proc, sink


def finish(proc: subprocess.Popen, sink, timeout: float = 300) -> int:
    """Wait for a started merge; kill its process group whatever happens."""
    try:
        return proc.wait(timeout=timeout)
    finally:
        sink.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def cli_merge(recipe: Path, out: Path, store: Path, log: Path, **kwargs) -> tuple[int, str]:
    """Run one ``dareflow merge`` to the end: (exit code, its output)."""
    code = finish(*start_merge(recipe, out, store, log, **kwargs))
    return code, log.read_text()


def error_lines(text: str) -> list[str]:
    """The ``error: ...`` lines the CLI printed."""
    return [line for line in text.splitlines() if line.startswith("error: ")]


def assert_complete_model(out: Path) -> dict:
    """``out`` is one whole merged model: every shard the manifest lists, with its sha256,
    and nothing else than the index, config, tokenizer, card and manifest; no temporary
    file. Returns the manifest."""
    manifest = json.loads((out / "manifest.json").read_text())
    shards = manifest["shards"]
    assert shards, manifest
    for name, meta in shards.items():
        data = (out / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == meta["sha256"], name
        assert len(data) == meta["bytes"], name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "README.md", "manifest.json", "model.safetensors.index.json",
            "tokenizer.json"} <= names, names
    assert names - set(shards) <= {"config.json", "README.md", "manifest.json",
                                    "model.safetensors.index.json", "tokenizer.json",
                                    "tokenizer_config.json", "generation_config.json",
                                    "special_tokens_map.json"}, names
    return manifest


def shard_digests(out: Path) -> dict[str, str]:
    """sha256 of every ``*.safetensors`` file in ``out``."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.glob("*.safetensors"))}
