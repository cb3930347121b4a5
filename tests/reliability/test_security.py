"""Security: only safetensors are loaded, remote code stays off, and credentials from
the environment never reach logs, model cards, manifests, artifacts or the store."""

from __future__ import annotations

import inspect
import logging
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest

from dareflow.flows.merge import run_merge
from tests.reliability.conftest import WEIGHTS, refused, write_recipe

ROOT = Path(__file__).resolve().parents[2]


class _Payload:
    """Unpickling this creates a folder: proof that a pickle was loaded."""

    def __init__(self, proof: Path):
        self.proof = str(proof)

    def __reduce__(self):
        return (os.mkdir, (self.proof,))


def test_pickle_only_checkpoint_is_refused_without_being_loaded(pico_family, tmp_path):
    evil = tmp_path / "pickle-ft"
    shutil.copytree(pico_family["a"], evil)
    (evil / WEIGHTS).unlink()
    proof = tmp_path / "pickle-was-loaded"
    (evil / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Payload(proof)}))
    msg = refused({"merge_method": "task_arithmetic", "base_model": str(pico_family["base"]),
                   "models": [{"model": str(evil)}]}, tmp_path)
    assert not proof.exists(), "the pickle was unpickled"
    assert "pytorch_model.bin" in msg and "pickle" in msg
    assert "allow_pickle: true" in msg or "Convert it to safetensors" in msg, msg


def test_no_code_enables_trust_remote_code():
    pattern = re.compile(r"trust_remote_code\W{1,4}True")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for folder in ("tasks", "flows")
                 for p in sorted((ROOT / folder).rglob("*.py"))
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if pattern.search(line)]
    assert offenders == []


def test_evaluation_runs_without_remote_code_by_default(tmp_path):
    from lm_eval.models.huggingface import HFLM

    from dareflow.evaluation.runner import model_spec

    name, args = model_spec(tmp_path, "hf", "cpu")
    assert name == "hf" and args.get("trust_remote_code", False) is False
    # what lm-eval does when model_args do not say: no remote code
    assert inspect.signature(HFLM.__init__).parameters["trust_remote_code"].default is False


SECRET = "SECRETMARKER-7f3a9c-aws"
TOKEN = "hf_TOKENMARKER-51d2e8"


@pytest.fixture
def secret_s3(tmp_path, monkeypatch):
    """A nanio server whose secret key is the marker; AWS_* point at it."""
    from tests.servers import REGION, nanio_s3_server

    server = nanio_s3_server(tmp_path / "nanio-data", secret_key=SECRET).start()
    try:
        for var, value in server.credentials.items():
            monkeypatch.setenv(var, value)
        monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        import s3fs

        fs = s3fs.S3FileSystem(**server.storage_options(skip_instance_cache=True))
        fs.mkdir("secrets")
        yield server, tmp_path / "nanio-data"
    finally:
        server.stop()


def _files_containing(root: Path, *needles: str) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            hits += [f"{p}: {n}" for n in needles if n.encode() in data]
    return hits


def test_credentials_never_reach_logs_outputs_or_the_store(
        pico_family, secret_s3, tmp_path, capfd):
    _server, data_dir = secret_s3
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    handler = Keep(level=logging.DEBUG)
    loggers = [logging.getLogger(n) for n in ("", "prefect", "tasks", "flows", "s3fs",
                                              "botocore", "fsspec")]
    saved = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    try:
        recipe = write_recipe(tmp_path / "r.yaml", {
            "merge_method": "dare_linear", "base_model": str(pico_family["base"]),
            "models": [{"model": str(pico_family["a"]), "parameters": {"drop_rate": 0.5}}],
            "parameters": {"vocab_mismatch": "exclude_embeddings"}, "dtype": "float32"})
        out = tmp_path / "out"
        manifest = run_merge(str(recipe), str(out), store="s3://secrets/store", max_workers=1)
    finally:
        for lg, level in saved:
            lg.removeHandler(handler)
            lg.setLevel(level)
    captured = capfd.readouterr()
    logs = "\n".join(records) + captured.out + captured.err
    assert "unit" in logs and len(records) > 20  # the run really logged (debug included)
    assert SECRET not in logs and TOKEN not in logs
    assert SECRET not in repr(manifest) and TOKEN not in repr(manifest)
    assert {"README.md", "manifest.json", "config.json"} <= {p.name for p in out.iterdir()}
    assert list(data_dir.rglob("*.safetensors")), "the store on s3 holds the units"
    # every produced file: the output, the store's objects, Prefect's database and results
    assert _files_containing(out, SECRET, TOKEN) == []
    assert _files_containing(data_dir, SECRET, TOKEN) == []
    assert _files_containing(Path(os.environ["PREFECT_HOME"]), SECRET, TOKEN) == []
